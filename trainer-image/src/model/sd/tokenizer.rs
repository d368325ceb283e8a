//! CLIP's byte-level BPE tokenizer, loaded from either layout checkpoints ship:
//! `tokenizer.json` (Hugging Face tokenizers) or `vocab.json` + `merges.txt` (the slow
//! `CLIPTokenizer`). Written here rather than pulling the `tokenizers` crate (and its
//! onig/esaxx native builds) for one well-specified algorithm.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

use crate::model::ModelError;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const WORD_END: &str = "</w>";

/// A CLIP BPE tokenizer with its padding convention.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: Vec<char>,
    pattern: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::LoadTokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::ParseConfig {
        path: path.to_path_buf(),
        source,
    })
}

/// GPT-2/CLIP's reversible byte -> printable char table.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads from a `tokenizer*/` folder, preferring `tokenizer.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let json_path = dir.join("tokenizer.json");
        let (encoder, merges) = if json_path.is_file() {
            let v = read_json(&json_path)?;
            let model = v
                .get("model")
                .ok_or_else(|| err(&json_path, "no `model` section"))?;
            let vocab = model
                .get("vocab")
                .and_then(|v| v.as_object())
                .ok_or_else(|| err(&json_path, "no `model.vocab` map"))?;
            let mut encoder = HashMap::new();
            for (k, id) in vocab {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| err(&json_path, format!("vocab entry {k:?} is not an id")))?;
                encoder.insert(k.clone(), id);
            }
            if let Some(added) = v.get("added_tokens").and_then(|a| a.as_array()) {
                for t in added {
                    if let (Some(c), Some(id)) = (
                        t.get("content").and_then(|c| c.as_str()),
                        t.get("id").and_then(|i| i.as_u64()),
                    ) && let Ok(id) = u32::try_from(id)
                    {
                        encoder.insert(c.to_string(), id);
                    }
                }
            }
            let merges = model
                .get("merges")
                .and_then(|m| m.as_array())
                .ok_or_else(|| err(&json_path, "no `model.merges` list"))?
                .iter()
                .map(|m| match m {
                    Value::String(s) => s
                        .split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string())),
                    Value::Array(p) if p.len() == 2 => {
                        Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err(&json_path, "malformed merge entry"))?;
            (encoder, merges)
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            if !vocab_path.is_file() || !merges_path.is_file() {
                return Err(err(
                    dir,
                    "neither tokenizer.json nor vocab.json + merges.txt found",
                ));
            }
            let encoder: HashMap<String, u32> = serde_json::from_value(read_json(&vocab_path)?)
                .map_err(|e| err(&vocab_path, e.to_string()))?;
            let text =
                std::fs::read_to_string(&merges_path).map_err(|source| ModelError::ReadFile {
                    path: merges_path.clone(),
                    source,
                })?;
            let merges = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    l.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| err(&merges_path, format!("malformed merge line {l:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (encoder, merges)
        };

        // Padding and length conventions differ between the two SDXL tokenizers.
        let mut pad_token = EOS.to_string();
        let mut max_length = 77usize;
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(file);
            if p.is_file() {
                let v = read_json(&p)?;
                if let Some(t) = v.get("pad_token").and_then(token_text) {
                    pad_token = t;
                }
                if let Some(m) = v.get("model_max_length").and_then(|m| m.as_u64())
                    && (2..=4096).contains(&m)
                {
                    max_length = m as usize;
                }
            }
        }
        let id = |tok: &str| -> Result<u32, ModelError> {
            encoder
                .get(tok)
                .copied()
                .ok_or_else(|| err(dir, format!("vocabulary has no {tok:?} token")))
        };
        let bos = id(BOS)?;
        let eos = id(EOS)?;
        let pad = id(&pad_token)?;
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, i))
            .collect();
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| err(dir, e.to_string()))?;
        Ok(Self {
            encoder,
            ranks,
            byte_chars: bytes_to_unicode(),
            pattern,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Token ids of `text` without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let lower = cleaned.to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&lower) {
            let piece = m.as_str();
            if let Some(&id) = self.encoder.get(piece)
                && (piece == BOS || piece == EOS)
            {
                ids.push(id);
                continue;
            }
            let chars: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
            for sym in self.bpe(&chars) {
                ids.push(self.encoder.get(&sym).copied().unwrap_or(self.eos));
            }
        }
        ids
    }

    /// BOS + ids (truncated) + EOS, padded to `max_length`; also the EOS position.
    pub fn encode_padded(&self, text: &str) -> (Vec<u32>, usize) {
        let mut ids = self.encode(text);
        ids.truncate(self.max_length.saturating_sub(2));
        let mut row = Vec::with_capacity(self.max_length);
        row.push(self.bos);
        row.extend(ids);
        let eos_pos = row.len();
        row.push(self.eos);
        row.resize(self.max_length, self.pad);
        (row, eos_pos)
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let mut parts: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str(WORD_END);
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((rank, _)) = best else { break };
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len()
                    && self.ranks.get(&(parts[i].clone(), parts[i + 1].clone())) == Some(&rank)
                {
                    merged.push(format!("{}{}", parts[i], parts[i + 1]));
                    i += 2;
                } else {
                    merged.push(parts[i].clone());
                    i += 1;
                }
            }
            parts = merged;
        }
        parts
    }
}

/// A BPE vocabulary in CLIP's layout: byte symbols, byte symbols + `</w>`, merges, specials.
#[derive(Debug, Clone)]
pub struct BpeVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl BpeVocab {
    /// Learns up to `num_merges` merges from `words` (classic BPE: repeatedly merge the most
    /// frequent adjacent pair, ties broken by first occurrence order).
    pub fn train(words: &[&str], num_merges: usize) -> Self {
        let table = bytes_to_unicode();
        // CLIP orders the byte symbols by code point: printable bytes first, so "!" is id 0.
        let mut symbols = table.clone();
        symbols.sort();
        let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        tokens.extend(symbols.iter().map(|c| format!("{c}{WORD_END}")));
        let mut corpus: Vec<Vec<String>> = words
            .iter()
            .map(|w| {
                let mut parts: Vec<String> = w
                    .to_lowercase()
                    .bytes()
                    .map(|b| table[b as usize].to_string())
                    .collect();
                if let Some(last) = parts.last_mut() {
                    last.push_str(WORD_END);
                }
                parts
            })
            .collect();
        let mut merges = Vec::new();
        while merges.len() < num_merges {
            let mut counts: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
            let mut order = 0usize;
            for word in &corpus {
                for w in word.windows(2) {
                    let e = counts
                        .entry((w[0].clone(), w[1].clone()))
                        .or_insert((0, order));
                    e.0 += 1;
                    order += 1;
                }
            }
            let Some((pair, _)) = counts
                .into_iter()
                .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
            else {
                break;
            };
            let joined = format!("{}{}", pair.0, pair.1);
            for word in &mut corpus {
                let mut out = Vec::with_capacity(word.len());
                let mut i = 0;
                while i < word.len() {
                    if i + 1 < word.len() && word[i] == pair.0 && word[i + 1] == pair.1 {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(word[i].clone());
                        i += 1;
                    }
                }
                *word = out;
            }
            if !tokens.contains(&joined) {
                tokens.push(joined);
            }
            merges.push(pair);
        }
        tokens.push(BOS.to_string());
        tokens.push(EOS.to_string());
        Self { tokens, merges }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn vocab_map(&self) -> serde_json::Map<String, Value> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), Value::from(i)))
            .collect()
    }

    /// Writes `vocab.json`, `merges.txt`, `special_tokens_map.json` and
    /// `tokenizer_config.json` (the slow-tokenizer layout).
    pub fn write_vocab_merges(&self, dir: &Path, pad_token: &str) -> Result<(), ModelError> {
        write(&dir.join("vocab.json"), &Value::Object(self.vocab_map()))?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(&format!("{a} {b}\n"));
        }
        write_text(&dir.join("merges.txt"), &merges)?;
        self.write_special(dir, pad_token)
    }

    /// Writes `tokenizer.json` (the fast-tokenizer layout) plus the special token files.
    pub fn write_tokenizer_json(&self, dir: &Path, pad_token: &str) -> Result<(), ModelError> {
        let n = self.tokens.len();
        let added: Vec<Value> = [(BOS, n - 2), (EOS, n - 1)]
            .iter()
            .map(|(t, id)| serde_json::json!({"id": id, "content": t, "special": true}))
            .collect();
        let merges: Vec<Value> = self
            .merges
            .iter()
            .map(|(a, b)| Value::from(format!("{a} {b}")))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": added,
            "model": {
                "type": "BPE",
                "continuing_subword_prefix": "",
                "end_of_word_suffix": WORD_END,
                "unk_token": EOS,
                "vocab": Value::Object(self.vocab_map()),
                "merges": merges,
            }
        });
        write(&dir.join("tokenizer.json"), &json)?;
        self.write_special(dir, pad_token)
    }

    fn write_special(&self, dir: &Path, pad_token: &str) -> Result<(), ModelError> {
        write(
            &dir.join("special_tokens_map.json"),
            &serde_json::json!({
                "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token
            }),
        )?;
        write(
            &dir.join("tokenizer_config.json"),
            &serde_json::json!({
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": true,
                "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token
            }),
        )
    }
}

pub(crate) fn write(path: &Path, v: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::WriteModel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_text(path, &text)
}

pub(crate) fn write_text(path: &Path, text: &str) -> Result<(), ModelError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| write_err(parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| write_err(path, e))
}

pub(crate) fn write_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::WriteModel {
        path: PathBuf::from(path),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_starting_with_bang() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], '\u{120}');
        let mut sorted = t.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn trained_merges_compress_training_words() {
        let v = BpeVocab::train(&["photo", "photo", "of"], 10);
        assert_eq!(v.merges[0], ("p".to_string(), "h".to_string()));
        let dir = std::env::temp_dir().join(format!("bpe-unit-{}", std::process::id()));
        v.write_vocab_merges(&dir, EOS).unwrap();
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        // "photo</w>" becomes one token once all merges are learnt.
        assert_eq!(tok.encode("Photo").len(), 1);
        let (row, eos) = tok.encode_padded("photo of");
        assert_eq!(row.len(), 77);
        assert_eq!(eos, 3);
        assert_eq!(row[3], tok.eos_id());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
