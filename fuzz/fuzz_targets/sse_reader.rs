//! Arbitrary server bytes, split at arbitrary points, never panic the SSE
//! reader, and splitting never changes the events it yields.
#![no_main]

use hypha_bench::sse::SseReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = SseReader::default();
    let all = whole.push(bytes);
    let at = usize::from(split) % (bytes.len() + 1);
    let mut parts = SseReader::default();
    let first = parts.push(&bytes[..at]);
    let second = parts.push(&bytes[at..]);
    if let (Ok(all), Ok(mut a), Ok(b)) = (all, first, second) {
        a.extend(b);
        assert_eq!(all, a);
    }
});
