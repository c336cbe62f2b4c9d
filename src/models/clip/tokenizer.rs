//! CLIP's byte-level BPE tokenizer, token for token as Stable Diffusion v1.x runs it:
//! transformers' `CLIPTokenizer` over openai/clip-vit-large-patch14's vocabulary (49,408 tokens,
//! BOS 49406 `<|startoftext|>`, EOS 49407 `<|endoftext|>`), 77 tokens padded with EOS.
//!
//! The pipeline, in transformers' (5.x) order:
//! 1. the literal string `<|endoftext|>` in the raw prompt becomes EOS;
//! 2. every other stretch is NFC-normalised and lowercased char by char (so no final-sigma rule:
//!    `Σ` always becomes `σ`), and `<|startoftext|>` in that text becomes BOS;
//! 3. the rest is split with CLIP's pattern: the two special strings (tokenized as text here),
//!    the contractions `'s 't 're 've 'm 'll 'd`, runs of letters (`\p{L}+`), single digits
//!    (`\p{N}`), and runs of anything else but whitespace; whitespace only separates;
//! 4. each piece's UTF-8 bytes become the 256 byte symbols, the last one marked end-of-word
//!    (`</w>`), and OpenAI's merges apply lowest rank first (a special-string piece is first
//!    cut into `<|`, its name and `|>`, as transformers' byte-level step does).
//!
//! Implementation choice: a hand-written BPE over OpenAI's merges file, embedded from
//! `assets/clip/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT; see assets/clip/LICENSE), with
//! `regex` (built with the features burn already uses) and `unicode-normalization` (NFC). Both
//! crates on offer, `tokenizers` 0.22 and `instant-clip-tokenizer` 0.1, switch on ahash's
//! `runtime-rng` (random hash seeds inside burn-std) and regex's `std`, rebuilding the whole burn
//! stack, and `tokenizers` alone costs ~75 s of one core to compile; instant-clip-tokenizer also
//! skips NFC. Equality with transformers is pinned by `tests/fixtures/clip_tokenizer/`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result, io_err};

/// `<|startoftext|>`: the first token of every encoded prompt.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`: the last token of every encoded prompt, and its padding.
pub const EOS: u32 = 49407;
/// SD1.x's text context length.
pub const MAX_LEN: usize = 77;
/// Tokens in OpenAI's CLIP vocabulary: 2 x 256 byte symbols, the merges, BOS and EOS.
pub const VOCAB_SIZE: usize = 49408;

const BOS_TEXT: &str = "<|startoftext|>";
const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// OpenAI's `bpe_simple_vocab_16e6.txt.gz`, byte for byte (sha256 `924691ac...804a`).
static OPENAI_BPE_GZ: &[u8] = include_bytes!("../../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// CLIP's pre-token pattern (leftmost alternative wins, as in transformers).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// CLIP's byte-level BPE tokenizer (see the module doc).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Id of each byte as a symbol inside a word.
    byte_ids: [u32; 256],
    /// Id of each byte as the last symbol of a word (`</w>`).
    byte_end_ids: [u32; 256],
    /// `(left, right)` -> `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    split: Regex,
    bos: u32,
    eos: u32,
    vocab_size: usize,
}

impl ClipTokenizer {
    /// The SD1.x tokenizer (OpenAI's CLIP vocabulary, embedded: no files needed at run time).
    pub fn sd() -> Result<Self> {
        let (tokens, merges) = openai_vocabulary()?;
        let vocab = tokens.into_iter().zip(0u32..).collect();
        Self::from_parts(vocab, merges).map_err(|e| e.context("embedded CLIP vocabulary"))
    }

    /// Reads a Hugging Face / diffusers tokenizer folder (`tokenizer/` of an SD1.x repository):
    /// `vocab.json` (token -> id) and `merges.txt` (one `left right` merge a line, in rank order,
    /// after an optional `#version` header). Normalisation and special-token rules stay SD1.x's
    /// (see the module doc) whatever the folder's `tokenizer_config.json` says.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::usage(format!(
                "{}: not a folder (expected a tokenizer folder with vocab.json and merges.txt)",
                dir.display()
            )));
        }
        let vocab_path = dir.join("vocab.json");
        let text = std::fs::read_to_string(&vocab_path).map_err(|e| io_err(&vocab_path, e))?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| Error::runtime(format!("{}: not a token -> id map: {e}", vocab_path.display())))?;
        let merges_path = dir.join("merges.txt");
        let text = std::fs::read_to_string(&merges_path).map_err(|e| io_err(&merges_path, e))?;
        let mut merges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.is_empty() {
                continue;
            }
            let pair =
                line.split_once(' ').filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '));
            let Some((a, b)) = pair else {
                return Err(Error::runtime(format!(
                    "{}:{}: expected `left right`, got {line:?}",
                    merges_path.display(),
                    n + 1
                )));
            };
            merges.push((a.to_string(), b.to_string()));
        }
        Self::from_parts(vocab, merges).map_err(|e| e.context(dir.display()))
    }

    /// Builds the tokenizer from a vocabulary and the merges in rank order; every byte symbol
    /// (with and without `</w>`), every merge's parts and result, BOS and EOS must be in `vocab`.
    fn from_parts(vocab: HashMap<String, u32>, merges: Vec<(String, String)>) -> Result<Self> {
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| Error::runtime(format!("token {token:?} not in the vocabulary")))
        };
        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (byte, symbol) in byte_symbols() {
            byte_ids[byte as usize] = id(&symbol.to_string())?;
            byte_end_ids[byte as usize] = id(&format!("{symbol}{END_OF_WORD}"))?;
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in (0u32..).zip(&merges) {
            let merged = id(&format!("{a}{b}"))?;
            // OpenAI's merges repeat no pair; were one repeated, its last rank would win (as in Python).
            merge_map.insert((id(a)?, id(b)?), (rank, merged));
        }
        let split =
            Regex::new(SPLIT_PATTERN).map_err(|e| Error::runtime(format!("CLIP split pattern: {e}")))?;
        Ok(Self {
            byte_ids,
            byte_end_ids,
            merges: merge_map,
            split,
            bos: id(BOS_TEXT)?,
            eos: id(EOS_TEXT)?,
            vocab_size: vocab.len(),
        })
    }

    /// Number of tokens in the vocabulary (49,408 for SD1.x).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `prompt`: BOS, its tokens, EOS, padded with EOS to `max_len` (SD: 77). A
    /// longer prompt keeps its first `max_len - 2` tokens, and EOS stays last. `max_len` below 2
    /// leaves no room for BOS: 1 gives `[EOS]`, 0 an empty vector.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Vec<u32> {
        if max_len < 2 {
            return vec![self.eos; max_len];
        }
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        self.encode_into(prompt, max_len - 2, &mut ids);
        ids.truncate(max_len - 1);
        ids.resize(max_len, self.eos);
        ids
    }

    /// All token ids of `prompt`, without BOS/EOS, padding or truncation (its length tells
    /// whether `encode` truncates: more than `max_len - 2` tokens).
    pub fn tokens(&self, prompt: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(prompt, usize::MAX, &mut ids);
        ids
    }

    /// Appends the tokens of `prompt` to `out`, stopping once `limit` tokens were added.
    fn encode_into(&self, prompt: &str, limit: usize, out: &mut Vec<u32>) {
        let end = out.len().saturating_add(limit);
        // As transformers 5 sets up SD1.x's tokenizer folder: `<|endoftext|>` is matched in the
        // raw text, `<|startoftext|>` in the normalised text (so `<|StartOfText|>` is BOS but
        // `<|ENDOFTEXT|>` is split like any text).
        for (i, raw) in prompt.split(EOS_TEXT).enumerate() {
            if i > 0 {
                if out.len() >= end {
                    return;
                }
                out.push(self.eos);
            }
            if raw.is_empty() {
                continue;
            }
            let normal: String = raw.nfc().flat_map(char::to_lowercase).collect();
            for (j, text) in normal.split(BOS_TEXT).enumerate() {
                if j > 0 {
                    if out.len() >= end {
                        return;
                    }
                    out.push(self.bos);
                }
                for piece in self.split.find_iter(text) {
                    if out.len() >= end {
                        return;
                    }
                    let piece = piece.as_str();
                    if piece == BOS_TEXT || piece == EOS_TEXT {
                        // A special string that was not matched as a token (`<|ENDOFTEXT|>`
                        // lowercased) is one piece, which the byte-level step re-splits with
                        // GPT-2's pattern into `<|`, the name and `|>`. Every other piece
                        // passes that pattern unchanged.
                        let name = piece.len() - 2;
                        for part in [&piece[..2], &piece[2..name], &piece[name..]] {
                            self.bpe(part.as_bytes(), out);
                        }
                    } else {
                        self.bpe(piece.as_bytes(), out);
                    }
                }
            }
        }
    }

    /// Byte-level BPE of one pre-token (never empty): repeatedly merges every occurrence of the
    /// lowest-ranked adjacent pair, left to right, until no pair has a merge.
    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let Some((&last, inner)) = bytes.split_last() else { return };
        let mut word: Vec<u32> = inner.iter().map(|&b| self.byte_ids[b as usize]).collect();
        word.push(self.byte_end_ids[last as usize]);
        let mut next = Vec::with_capacity(word.len());
        loop {
            let best = word
                .windows(2)
                .filter_map(|pair| {
                    self.merges.get(&(pair[0], pair[1])).map(|&(rank, id)| (rank, pair[0], pair[1], id))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, left, right, merged)) = best else { break };
            next.clear();
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == left && word[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            std::mem::swap(&mut word, &mut next);
        }
        out.extend_from_slice(&word);
    }
}

/// The 256 bytes with the printable character that stands for each in the vocabulary, in
/// vocabulary order: bytes `!`..`~`, `¡`..`¬` and `®`..`ÿ` stand for themselves and come first;
/// the other 68 (controls, space, DEL, NBSP, soft hyphen) follow in byte order as U+0100...
fn byte_symbols() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut symbols: Vec<(u8, char)> =
        (0..=255u8).filter(|&b| printable(b)).map(|b| (b, char::from(b))).collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    symbols.extend(others.zip(0x100u32..).map(|(b, c)| (b, char::from_u32(c).expect("U+0100..U+0143"))));
    symbols
}

/// OpenAI's vocabulary in id order, and its merges in rank order, from the embedded file:
/// header line, then 48,894 merges (the rest of the file is unused by CLIP).
fn openai_vocabulary() -> Result<(Vec<String>, Vec<(String, String)>)> {
    let n_merges = VOCAB_SIZE - 512 - 2;
    let gz = flate2::read::GzDecoder::new(OPENAI_BPE_GZ);
    let mut lines = BufReader::new(gz).lines();
    lines.next().transpose().map_err(|e| Error::runtime(format!("header: {e}")))?;
    let mut merges = Vec::with_capacity(n_merges);
    for line in lines.take(n_merges) {
        let line = line.map_err(|e| Error::runtime(format!("merges: {e}")))?;
        let (a, b) =
            line.split_once(' ').ok_or_else(|| Error::runtime(format!("bad merge line {line:?}")))?;
        merges.push((a.to_string(), b.to_string()));
    }
    if merges.len() != n_merges {
        return Err(Error::runtime(format!("{} merges, expected {n_merges}", merges.len())));
    }
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(|&(_, c)| c.to_string()).collect();
    tokens.extend(symbols.iter().map(|&(_, c)| format!("{c}{END_OF_WORD}")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS_TEXT.to_string());
    tokens.push(EOS_TEXT.to_string());
    Ok((tokens, merges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// transformers' CLIPTokenizer ids (tools/gen_tokenizer_fixture.py).
    const REFERENCE: &str = include_str!("../../../tests/fixtures/clip_tokenizer/reference_ids.json");

    #[derive(serde::Deserialize)]
    struct Row {
        prompt: String,
        ids: Vec<u32>,
    }

    fn reference() -> Vec<Row> {
        serde_json::from_str(REFERENCE).expect("reference_ids.json")
    }

    fn trim(ids: &[u32]) -> &[u32] {
        let mut end = ids.len();
        while end > 2 && ids[end - 1] == EOS && ids[end - 2] == EOS {
            end -= 1;
        }
        &ids[..end]
    }

    /// Every reference prompt; all mismatches reported at once.
    fn check_reference(tok: &ClipTokenizer) {
        let rows = reference();
        assert!(rows.len() >= 60, "{} reference prompts", rows.len());
        let mut failures = Vec::new();
        for row in &rows {
            let ids = tok.encode(&row.prompt, MAX_LEN);
            if ids != row.ids {
                failures.push(format!(
                    "{:?}\n  expected {:?}\n  got      {:?}",
                    row.prompt,
                    trim(&row.ids),
                    trim(&ids)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} prompts differ:\n{}",
            failures.len(),
            rows.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn embedded_file_is_openais() {
        let digest = Sha256::digest(OPENAI_BPE_GZ);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a");
    }

    #[test]
    fn vocabulary_layout() {
        let tok = ClipTokenizer::sd().unwrap();
        assert_eq!(tok.vocab_size(), VOCAB_SIZE);
        assert_eq!((tok.bos, tok.eos), (BOS, EOS));
        assert_eq!(tok.merges.len(), VOCAB_SIZE - 514);
        // `!` is the first byte symbol, `a` is 0x61 - 0x21, space is the 33rd non-printable.
        assert_eq!(tok.byte_ids[b'!' as usize], 0);
        assert_eq!(tok.byte_ids[b'a' as usize], 0x61 - 0x21);
        assert_eq!(tok.byte_end_ids[b'a' as usize], 0x61 - 0x21 + 256);
        assert_eq!(tok.byte_ids[b' ' as usize], 188 + 32);
    }

    #[test]
    fn openai_example() {
        let tok = ClipTokenizer::sd().unwrap();
        assert_eq!(tok.tokens("Hi there"), [1883, 997]);
        let ids = tok.encode("Hi there", MAX_LEN);
        assert_eq!(ids.len(), MAX_LEN);
        assert_eq!(ids[..4], [BOS, 1883, 997, EOS]);
        assert!(ids[4..].iter().all(|&id| id == EOS));
        assert_eq!(tok.encode("a photo of a cat", 9), [BOS, 320, 1125, 539, 320, 2368, EOS, EOS, EOS]);
    }

    #[test]
    fn matches_transformers_reference() {
        check_reference(&ClipTokenizer::sd().unwrap());
    }

    #[test]
    fn truncation_keeps_eos_last() {
        let tok = ClipTokenizer::sd().unwrap();
        let rows = reference();
        let long: Vec<&Row> = rows.iter().filter(|r| tok.tokens(&r.prompt).len() > MAX_LEN - 2).collect();
        assert!(long.len() >= 3, "the fixture needs over-long prompts");
        for row in long {
            let all = tok.tokens(&row.prompt);
            let ids = tok.encode(&row.prompt, MAX_LEN);
            assert_eq!(ids.len(), MAX_LEN);
            assert_eq!(ids[0], BOS);
            assert_eq!(ids[1..MAX_LEN - 1], all[..MAX_LEN - 2]);
            assert_eq!(ids[MAX_LEN - 1], EOS);
        }
        // Exactly 75 tokens: no padding and nothing cut; 76: one cut.
        assert_eq!(tok.encode(&"a ".repeat(75), MAX_LEN), [vec![BOS], vec![320; 75], vec![EOS]].concat());
        assert_eq!(tok.encode(&"a ".repeat(76), MAX_LEN), [vec![BOS], vec![320; 75], vec![EOS]].concat());
        // Tiny lengths.
        assert_eq!(tok.encode("a photo", 2), [BOS, EOS]);
        assert_eq!(tok.encode("a photo", 3), [BOS, 320, EOS]);
        assert_eq!(tok.encode("a photo", 1), [EOS]);
        assert!(tok.encode("a photo", 0).is_empty());
    }

    #[test]
    fn special_token_strings() {
        let tok = ClipTokenizer::sd().unwrap();
        assert_eq!(tok.tokens("a<|endoftext|>b"), [320, EOS, 321]);
        assert_eq!(tok.tokens("<|startoftext|><|endoftext|>"), [BOS, EOS]);
        // BOS is matched after lowercasing, EOS only as written (transformers 5.24's setup).
        assert_eq!(tok.tokens("<|StartOfText|>"), [BOS]);
        assert!(!tok.tokens("<|ENDOFTEXT|>").contains(&EOS));
    }

    #[test]
    fn from_dir_reads_vocab_and_merges() {
        let (tokens, merges) = openai_vocabulary().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.into_iter().zip(0u32..).map(|(t, i)| (t, i.into())).collect();
        std::fs::write(dir.path().join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in &merges {
            text.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(dir.path().join("merges.txt"), text).unwrap();
        check_reference(&ClipTokenizer::from_dir(dir.path()).unwrap());
    }

    #[test]
    fn from_dir_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ClipTokenizer::from_dir(dir.path().join("nope")).unwrap_err();
        assert_eq!(missing.kind, crate::error::ErrorKind::Usage);
        let no_vocab = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(no_vocab.message.contains("vocab.json"), "{}", no_vocab.message);
        std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0}"#).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na\n").unwrap();
        let bad = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(bad.message.contains("merges.txt:2"), "{}", bad.message);
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
        let incomplete = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(incomplete.message.contains("not in the vocabulary"), "{}", incomplete.message);
    }
}
