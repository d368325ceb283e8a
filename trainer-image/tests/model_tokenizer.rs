//! The CLIP tokenizer gives the same ids from both checkpoint layouts (`tokenizer.json` and
//! `vocab.json` + `merges.txt`), with CLIP's BOS/EOS/padding conventions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use loraplane_trainer::model::tokenizer::ClipTokenizer;
use loraplane_trainer::model::{ModelFamily, tiny};
use serde_json::{Value, json};

/// Converts the slow layout to a Hugging Face `tokenizer.json`, as `CLIPTokenizerFast`
/// checkpoints ship it (merges in the newer pair-array form).
fn write_tokenizer_json(from: &std::path::Path, to: &std::path::Path) {
    let vocab: HashMap<String, u64> =
        serde_json::from_str(&std::fs::read_to_string(from.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<Value> = std::fs::read_to_string(from.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            json!([a, b])
        })
        .collect();
    let added: Vec<Value> = ["<|startoftext|>", "<|endoftext|>"]
        .iter()
        .map(|t| json!({"id": vocab[*t], "content": t, "special": true}))
        .collect();
    let doc = json!({
        "version": "1.0",
        "added_tokens": added,
        "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": vocab, "merges": merges},
    });
    std::fs::create_dir_all(to).unwrap();
    std::fs::write(to.join("tokenizer.json"), doc.to_string()).unwrap();
    std::fs::copy(
        from.join("tokenizer_config.json"),
        to.join("tokenizer_config.json"),
    )
    .unwrap();
}

#[test]
fn both_layouts_give_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_model(dir.path(), ModelFamily::Sdxl, 2).unwrap();
    let slow = ClipTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
    let fast_dir = dir.path().join("fast");
    write_tokenizer_json(&dir.path().join("tokenizer"), &fast_dir);
    assert!(!fast_dir.join("vocab.json").exists());
    let fast = ClipTokenizer::from_dir(&fast_dir).unwrap();

    for caption in [
        "a photo of sks dog",
        "A  PHOTO of\tzxq, wearing a red hat!",
        "portrait of ohwx woman, 35mm, f/1.8 — bokeh's glow",
        "",
        "<|endoftext|> odd",
    ] {
        assert_eq!(
            slow.encode_padded(caption),
            fast.encode_padded(caption),
            "{caption}"
        );
    }

    // Known words from the tiny corpus are single tokens; case and spacing do not matter.
    assert_eq!(slow.encode("photo").len(), 1);
    assert_eq!(slow.encode("A   Photo"), slow.encode("a photo"));
    let (row, eos) = slow.encode_padded("a photo");
    assert_eq!(row.len(), 77);
    assert_eq!(eos, 3);
    assert_eq!(row[eos], slow.eos_id());
    assert_eq!(row[76], slow.eos_id(), "tokenizer pads with EOS");

    // SDXL's second tokenizer pads with "!" (id 0), as in the real checkpoint.
    let second = ClipTokenizer::from_dir(&dir.path().join("tokenizer_2")).unwrap();
    let (row2, _) = second.encode_padded("a photo");
    assert_eq!(row2[..4], row[..4]);
    assert_eq!(row2[76], 0);

    // Long captions are truncated to 75 tokens between BOS and EOS.
    let long = "dog ".repeat(200);
    let (row, eos) = slow.encode_padded(&long);
    assert_eq!((row.len(), eos), (77, 76));
}

#[test]
fn missing_tokenizer_files_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}
