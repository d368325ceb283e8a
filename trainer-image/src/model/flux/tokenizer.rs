//! T5's tokenizer for FLUX.1's `tokenizer_2/`: SentencePiece Unigram with its normaliser
//! (`Precompiled` charsmap in the published checkpoints), `▁` word boundaries and `</s>`
//! appended, run by the `tokenizers` crate (which candle already builds), from `tokenizer.json`
//! or, in folders that only have it, SentencePiece's `spiece.model` (`spiece.rs`). Rows are truncated and padded to a fixed length as FLUX.1's pipeline does
//! (`padding="max_length"`, `truncation=True`).

use std::path::{Path, PathBuf};

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::model::ModelError;

/// A T5 tokenizer producing fixed-length rows.
#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    max_length: usize,
    /// The file it was read from, for errors.
    path: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json` (or `dir/spiece.model` where that is all there is); rows will
    /// hold `max_length` ids (FLUX.1-dev: 512, schnell: 256).
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self, ModelError> {
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        let path = if json.is_file() || !spiece.is_file() {
            json
        } else {
            spiece
        };
        let fail = |reason: String| ModelError::LoadTokenizer {
            path: path.clone(),
            reason,
        };
        let mut inner = if path.extension().is_some_and(|e| e == "json") {
            if !path.is_file() {
                return Err(fail(
                    "neither tokenizer.json nor spiece.model is there".to_string(),
                ));
            }
            Tokenizer::from_file(&path).map_err(|e| fail(e.to_string()))?
        } else {
            let bytes = std::fs::read(&path).map_err(|e| fail(e.to_string()))?;
            super::spiece::unigram_tokenizer(&bytes).map_err(fail)?
        };
        let pad_token = "<pad>";
        let pad_id = inner
            .token_to_id(pad_token)
            .ok_or_else(|| fail(format!("no {pad_token} token")))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| fail(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        Ok(Self {
            inner,
            max_length,
            path,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The ids of `text`: its pieces, `</s>`, then padding, `max_length` in all.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::LoadTokenizer {
                path: self.path.clone(),
                reason: format!("encoding a caption: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }
}
