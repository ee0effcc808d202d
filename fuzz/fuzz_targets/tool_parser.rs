//! The tool-call parser a consumer runs over a seeder's text
//! (`inference::tools::Parser`), in every format, with the text cut into
//! arbitrary chunks: it never panics, every call names an offered
//! function with an object of arguments, no more calls come than allowed,
//! and where no call was read the text comes back exactly as it came
//! (the generic format decodes its response string, so only the first
//! two hold there).
#![no_main]

use hypha_node::inference::tools::{Piece, Parser, ToolFormat, ToolSet, MAX_CALLS};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let format = [
        ToolFormat::Generic,
        ToolFormat::Hermes,
        ToolFormat::Llama3,
        ToolFormat::Mistral,
    ][usize::from(head & 3)];
    let parallel = head & 4 != 0;
    let choice = match (head >> 3) & 3 {
        0 => json!("auto"),
        1 => json!("required"),
        _ => json!({"type": "function", "function": {"name": "f"}}),
    };
    let tools = json!([
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "g"}},
    ]);
    let set = ToolSet::from_openai(Some(&tools), Some(&choice), Some(&json!(parallel)))
        .expect("the tools check")
        .expect("tools are offered");
    let named_only = ((head >> 3) & 3) >= 2;
    let mut parser = Parser::new(format, &set);
    let text = String::from_utf8_lossy(rest);
    // Chunks end after each '\u{1}' (kept in the text).
    let mut pieces = Vec::new();
    for chunk in text.split_inclusive('\u{1}') {
        pieces.extend(parser.push(chunk));
    }
    pieces.extend(parser.finish());
    let mut out = String::new();
    let mut calls = 0;
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(&t),
            Piece::Call { name, arguments } => {
                calls += 1;
                assert!(name == "f" || (name == "g" && !named_only), "{name}");
                let args: serde_json::Value =
                    serde_json::from_str(&arguments).expect("arguments are JSON");
                assert!(args.is_object());
            }
        }
    }
    assert!(calls <= if parallel { MAX_CALLS } else { 1 });
    if calls == 0 && format != ToolFormat::Generic {
        assert_eq!(out, text, "text without calls comes back as it came");
    }
});
