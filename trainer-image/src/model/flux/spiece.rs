//! SentencePiece's `spiece.model` (a `ModelProto` protobuf message), the form older T5
//! tokenizer folders ship without a `tokenizer.json`: its pieces, scores, unknown-piece id and
//! normaliser charsmap, turned into the same `tokenizers` pipeline transformers' converter
//! builds (`Precompiled` charsmap, repeated spaces folded, `▁` word boundaries, `</s>`
//! appended). Only the fields that pipeline needs are declared; prost skips the rest.

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Replace, Sequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{NormalizerWrapper, Tokenizer};

/// `sentencepiece_model.proto`'s `ModelProto`, the parts a Unigram tokenizer needs.
#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TrainerSpec {
    /// 1: Unigram (T5), 2: BPE, 3: word, 4: char.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NormalizerSpec {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
}

/// The tokenizer `spiece.model`'s bytes describe, with `</s>` appended to every row.
pub fn unigram_tokenizer(bytes: &[u8]) -> Result<Tokenizer, String> {
    let model = <ModelProto as prost::Message>::decode(bytes).map_err(|e| e.to_string())?;
    let trainer = model.trainer_spec.unwrap_or_default();
    if trainer.model_type.is_some_and(|t| t != 1) {
        return Err(format!(
            "a SentencePiece model of type {} (only Unigram, T5's, is supported)",
            trainer.model_type.unwrap_or_default()
        ));
    }
    let vocab: Vec<(String, f64)> = model
        .pieces
        .iter()
        .map(|p| {
            (
                p.piece.clone().unwrap_or_default(),
                f64::from(p.score.unwrap_or(0.0)),
            )
        })
        .collect();
    let eos = vocab
        .iter()
        .position(|(p, _)| p == "</s>")
        .ok_or("no </s> piece")?;
    let unk = usize::try_from(trainer.unk_id.unwrap_or(0)).map_err(|e| e.to_string())?;
    let unigram = Unigram::from(vocab, Some(unk), trainer.byte_fallback.unwrap_or(false))
        .map_err(|e| e.to_string())?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    let charsmap = model
        .normalizer_spec
        .and_then(|n| n.precompiled_charsmap)
        .unwrap_or_default();
    if !charsmap.is_empty() {
        normalizers.push(
            Precompiled::from(&charsmap)
                .map_err(|e| e.to_string())?
                .into(),
        );
    }
    let spaces = tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into());
    normalizers.push(Replace::new(spaces, " ").map_err(|e| e.to_string())?.into());
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .map_err(|e| e.to_string())?
        .special_tokens(vec![("</s>", eos as u32)])
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(unigram);
    tokenizer
        .with_normalizer(Some(Sequence::new(normalizers)))
        .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(Metaspace::new(
        '\u{2581}',
        PrependScheme::Always,
        true,
    )));
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}
