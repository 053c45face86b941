//! Generated tokens to text, incrementally: each token's text as soon as it is complete UTF-8,
//! stop strings found across token boundaries, and text that might be the start of a stop
//! string held back until it is known not to be (so a stop string never reaches the client).

use std::sync::Arc;

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// What one more token adds to the visible text.
#[derive(Debug, PartialEq, Eq)]
pub struct Delta {
    /// Text that may now be shown (possibly empty).
    pub text: String,
    /// A stop string was produced: generation ends; the stop string and what follows are cut.
    pub stopped: bool,
}

pub struct IncrementalText {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Decoding restarts from `prefix` so a token's text comes out with its context (leading
    /// spaces, multi-byte characters split over tokens) without decoding everything each time.
    prefix: usize,
    read: usize,
    /// All decoded text so far, and how much of it was handed out.
    text: String,
    shown: usize,
    stops: Vec<String>,
}

impl IncrementalText {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0, text: String::new(), shown: 0, stops }
    }

    /// Adds a generated token.
    pub fn push(&mut self, id: u32) -> Result<Delta> {
        self.ids.push(id);
        let before = self.decode(self.prefix..self.read)?;
        let after = self.decode(self.prefix..self.ids.len())?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token.
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = after.get(before.len()..).unwrap_or_default();
            self.text.push_str(new);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(self.release())
    }

    /// The held-back text, when generation ends for another reason than a stop string.
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.shown..].to_string();
        self.shown = self.text.len();
        rest
    }

    fn decode(&self, range: std::ops::Range<usize>) -> Result<String> {
        self.tokenizer.decode(&self.ids[range], true).map_err(|e| anyhow!("detokenization failed: {e}"))
    }

    fn release(&mut self) -> Delta {
        // A stop string may straddle what was already shown and the new text: search a little
        // before the boundary (stops are found at their first occurrence).
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.shown.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            let at = at.max(self.shown);
            let text = self.text[self.shown..at].to_string();
            self.shown = self.text.len();
            return Delta { text, stopped: true };
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut end = self.text.len();
        for start in (self.shown..self.text.len()).filter(|&i| self.text.is_char_boundary(i)) {
            let tail = &self.text[start..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                end = start;
                break;
            }
        }
        let text = self.text[self.shown..end].to_string();
        self.shown = end;
        Delta { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        Arc::new(drq_tests::tiny_tokenizer())
    }

    fn ids(t: &Tokenizer, s: &str) -> Vec<u32> {
        t.encode(s, false).unwrap().get_ids().to_vec()
    }

    /// Feeds `text`'s tokens; returns the concatenated deltas and whether a stop was hit.
    fn run(text: &str, stops: &[&str]) -> (String, bool, Vec<String>) {
        let t = tokenizer();
        let mut inc = IncrementalText::new(t.clone(), stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut pieces = Vec::new();
        for id in ids(&t, text) {
            let d = inc.push(id).unwrap();
            out.push_str(&d.text);
            pieces.push(d.text);
            if d.stopped {
                return (out, true, pieces);
            }
        }
        out.push_str(&inc.finish());
        (out, false, pieces)
    }

    #[test]
    fn deltas_concatenate_to_the_decoded_text() {
        let text = "the cat sat, thé à 東京 🙂 the end";
        let (out, stopped, pieces) = run(text, &[]);
        assert_eq!(out, text);
        assert!(!stopped);
        // Multi-byte characters are split over byte tokens: no delta holds a broken character.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    }

    #[test]
    fn stop_strings_cut_and_are_never_shown() {
        let (out, stopped, pieces) = run("hello world. STOP here", &["STOP"]);
        assert_eq!(out, "hello world. ");
        assert!(stopped);
        // "S", "ST", "STO" were held back, never sent and then retracted.
        assert!(pieces.iter().all(|p| !p.contains('S')), "{pieces:?}");
        // The earliest of several stops wins, across token boundaries.
        let (out, stopped, _) = run("a b c d", &["c d", " b"]);
        assert_eq!((out.as_str(), stopped), ("a", true));
        // A partial match that is not completed is released at the end.
        let (out, stopped, _) = run("one ST", &["STOP"]);
        assert_eq!((out.as_str(), stopped), ("one ST", false));
        // A stop string at the very start.
        let (out, stopped, _) = run("STOP", &["STOP"]);
        assert_eq!((out.as_str(), stopped), ("", true));
    }
}
