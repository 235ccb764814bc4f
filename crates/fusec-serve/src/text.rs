//! The text side of a response: incremental detokenization and stop strings.

use fusec_text::Tokenizer;

/// Streaming detokenization over an owned list of ids: `tokenizers`' `DecodeStream`
/// algorithm (decode the ids since a prefix offset; emit the new suffix unless it ends
/// in U+FFFD, the mark of a character split across tokens), without borrowing the
/// tokenizer, so that it lives in an async stream beside an `Arc<Tokenizer>`.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl Detokenizer {
    pub fn new() -> Detokenizer {
        Detokenizer::default()
    }

    /// The ids fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text `id` completes (empty while a character is incomplete).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, fusec_text::Error> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids[self.prefix_index..], true)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') {
            let new = match text.get(self.prefix.len()..) {
                Some(rest) if text.starts_with(&self.prefix) => rest.to_string(),
                _ => return Ok(String::new()),
            };
            self.prefix_index = self.ids.len().saturating_sub(1);
            self.prefix = tokenizer.decode(&self.ids[self.prefix_index..], true)?;
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// What the whole decode of the ids adds to `shown` (held-back bytes, written as
    /// U+FFFD), so that the text sent is the decode of the ids.
    pub fn rest(&self, tokenizer: &Tokenizer, shown: &str) -> Result<String, fusec_text::Error> {
        let whole = tokenizer.decode(&self.ids, true)?;
        Ok(whole
            .strip_prefix(shown)
            .map(str::to_string)
            .unwrap_or_default())
    }
}

/// Text checked against stop strings as it streams: what may be sent now, holding back
/// any tail that could begin a stop string.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Text received and not sent yet.
    held: String,
    stopped: bool,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen (nothing more is sent).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes `piece`, returns what may be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // The longest tail of `held` that is a proper prefix of a stop string waits.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if tail.len() < s.len() && s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The end of the text: whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopText;

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_possible_starts() {
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("abc E"), "abc ");
        assert_eq!(s.push("N"), "");
        assert_eq!(s.push("X"), "ENX");
        assert_eq!(s.push("yyEND zzz"), "yy");
        assert!(s.stopped());
        assert_eq!(s.push("more"), "");
        let mut t = StopText::new(vec!["\n\n".into(), "é!".into()]);
        assert_eq!(t.push("aé"), "a");
        assert_eq!(t.push("b"), "éb");
        assert_eq!(t.push("c\n"), "c");
        assert_eq!(t.finish(), "\n");
        let mut none = StopText::new(Vec::new());
        assert_eq!(none.push("x"), "x");
    }
}
