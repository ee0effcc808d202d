//! A minimal reader for `text/event-stream` bodies, for hypha's own clients
//! (`hypha chat`, `hypha bench`): it yields each event's `data` field.

/// Splits an SSE byte stream into events' data payloads.
#[derive(Default)]
pub struct SseReader {
    buf: Vec<u8>,
}

/// An SSE event larger than this is refused: a server gone wrong must not
/// make the client buffer without bound.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

impl SseReader {
    /// Feeds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let Some(end) = find_event_end(&self.buf) else {
                if self.buf.len() > MAX_EVENT_BYTES {
                    return Err("server sent an oversized event".into());
                }
                return Ok(out);
            };
            let (event, sep) = end;
            let raw = String::from_utf8_lossy(&self.buf[..event]).into_owned();
            self.buf.drain(..event + sep);
            let mut data = Vec::new();
            for line in raw.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
                }
            }
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(
            r.push(b":1}\n\ndata: [DONE]\n\n").unwrap(),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn comments_are_skipped() {
        let mut r = SseReader::default();
        assert!(r.push(b": keep-alive\n\n").unwrap().is_empty());
    }
}
