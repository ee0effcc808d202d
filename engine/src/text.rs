//! Turning generated token pieces into the text a client sees.
//!
//! Two pieces of bookkeeping sit between llama.cpp's token pieces and the
//! stream sent to a client:
//! - [`Utf8Buf`] holds back bytes of a character that a token split, so every
//!   emitted chunk is valid UTF-8 and no character is ever mangled;
//! - [`StopMatcher`] finds stop strings even when they straddle token
//!   boundaries, and holds back only the tail that could still become a stop
//!   string, so the stop text itself is never emitted.

/// Accumulates raw token bytes and releases the longest valid UTF-8 prefix.
#[derive(Debug, Default)]
pub struct Utf8Buf {
    pending: Vec<u8>,
}

/// A UTF-8 sequence is at most four bytes: more than three pending bytes that
/// still do not decode can never become valid, so they are replaced.
const UTF8_MAX_HELD_BYTES: usize = 3;

impl Utf8Buf {
    /// Appends `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid by construction of `valid_up_to`.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Invalid bytes in the middle: replace them and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: hold it.
                        None => {
                            self.pending.drain(..valid);
                            if self.pending.len() > UTF8_MAX_HELD_BYTES {
                                out.push(char::REPLACEMENT_CHARACTER);
                                self.pending.clear();
                            }
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Releases whatever is held at the end of a generation.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet; this text may be emitted.
    Emit(String),
    /// A stop string matched; this text precedes it and is the last to
    /// emit. The index is the stop string's among those given to
    /// [`StopMatcher::new`].
    Stopped(String, usize),
}

/// Matches stop strings across token boundaries.
#[derive(Debug, Default)]
pub struct StopMatcher {
    /// The stop strings, each with its index among those given.
    stops: Vec<(usize, String)>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would match before any text.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| (i, s.clone()))
                .collect(),
            held: String::new(),
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Emit(text.to_owned());
        }
        self.held.push_str(text);
        // The earliest match wins: that is where the model's text stops
        // (between two at one place, the first given).
        let first = self
            .stops
            .iter()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, *i)))
            .min();
        if let Some((at, i)) = first {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopScan::Stopped(out, i);
        }
        // Hold the longest suffix that is a prefix of some stop string.
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopScan::Emit(out)
    }

    /// Releases held text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for (_, stop) in &self.stops {
            // Candidate suffix lengths, longest first, on char boundaries.
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if !self.held.is_char_boundary(start) {
                    continue;
                }
                if stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_character_is_held_until_whole() {
        let euro = "€".as_bytes(); // three bytes
        let mut buf = Utf8Buf::default();
        assert_eq!(buf.push(&euro[..1]), "");
        assert_eq!(buf.push(&euro[1..2]), "");
        assert_eq!(buf.push(&[euro[2], b'x']), "€x");
        assert_eq!(buf.finish(), "");
    }

    #[test]
    fn utf8_invalid_bytes_become_replacement() {
        let mut buf = Utf8Buf::default();
        assert_eq!(buf.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(buf.push(&[0xe2, 0x82]), "");
        assert_eq!(buf.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(&["END".to_owned()]);
        assert_eq!(m.push("hello E"), StopScan::Emit("hello ".into()));
        assert_eq!(m.push("N"), StopScan::Emit(String::new()));
        assert_eq!(m.push("D tail"), StopScan::Stopped(String::new(), 0));
    }

    #[test]
    fn false_partial_match_is_released() {
        let mut m = StopMatcher::new(&["END".to_owned()]);
        assert_eq!(m.push("xE"), StopScan::Emit("x".into()));
        assert_eq!(m.push("Nx"), StopScan::Emit("ENx".into()));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(&["bb".to_owned(), "a".to_owned()]);
        assert_eq!(m.push("xxbbya"), StopScan::Stopped("xx".into(), 0));
    }

    #[test]
    fn the_index_of_a_match_counts_empty_stops_too() {
        let mut m = StopMatcher::new(&[String::new(), "x".to_owned(), "yz".to_owned()]);
        assert_eq!(m.push("ay"), StopScan::Emit("a".into()));
        assert_eq!(m.push("z"), StopScan::Stopped(String::new(), 2));
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = StopMatcher::new(&[String::new()]);
        assert_eq!(m.push("abc"), StopScan::Emit("abc".into()));
    }

    #[test]
    fn partial_suffix_respects_char_boundaries() {
        let mut m = StopMatcher::new(&["é!".to_owned()]);
        assert_eq!(m.push("caf é"), StopScan::Emit("caf ".into()));
        assert_eq!(m.finish(), "é");
    }
}
