//! Request bodies of `/v1/chat/completions` and `/v1/completions` as the
//! node's HTTP edge decodes and checks them
//! (`hypha_node::api::errors::decode_body`, `ChatRequest::check`,
//! `CompletionRequest::check`), and the request a consumer then sends a
//! seeder (`hypha_node::api::openai::wire_request`).
//!
//! Bodies come raw from the input, and as JSON objects built from it with
//! the fields clients send (each of a right or wrong type, in or out of
//! range, some unknown).
//!
//! - A refused body gets an OpenAI-style error: a 4xx status and a JSON
//!   body `{"error": {"message", "type", "param", "code"}}` with a message.
//! - A checked body's stop strings, messages and roles are within the
//!   limits, and its sampling settings are ones the engine takes.
//! - What the edge lets through, a seeder lets through: the request a
//!   consumer builds from it crosses the wire unchanged and the seeder's
//!   own checks (`prepare`) take it, with the same prompt, stops, sampling,
//!   `max_tokens` and logprobs, and a grammar exactly when it carries a
//!   JSON schema (bodies carry response formats with schemas built from
//!   the input, which llama.cpp's converter then runs on). A request that
//!   passes the edge is never refused as malformed by a seeder.
#![no_main]

use hypha_node::api::errors::{decode_body, ApiError};
use hypha_node::api::openai::{ChatRequest, Checked, CompletionRequest, EdgePrompt};
use hypha_node::inference::convert::{
    prepare, sampling_from_wire, Prepared, MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
use hypha_node::inference::tools::ToolFormat;
use hypha_node::inference::prep::Input;
use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Message};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// Deepest JSON value built from the input.
const MAX_DEPTH: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let (kind, raw) = data.split_first().map_or((0, data), |(k, r)| (*k, r));
    body(kind & 1 == 0, raw);
    if let Ok(v) = built(&mut Unstructured::new(data)) {
        let bytes = serde_json::to_vec(&v).expect("a JSON value serializes");
        body(kind & 2 == 0, &bytes);
    }
});

/// One body at one endpoint.
fn body(chat: bool, bytes: &[u8]) {
    let result = if chat {
        decode_body::<ChatRequest>(bytes).and_then(|r| {
            let checked = r.check()?;
            Ok((r.model.clone(), checked, r.fields))
        })
    } else {
        decode_body::<CompletionRequest>(bytes).and_then(|r| {
            let checked = r.check()?;
            Ok((r.model.clone(), checked, r.fields))
        })
    };
    match result {
        Err(e) => refused(&e),
        Ok((model, checked, fields)) => {
            let Checked {
                prompt,
                stops,
                json_schema,
                tools,
            } = checked;
            assert!(stops.len() <= MAX_STOP_STRINGS);
            assert!(stops.iter().all(|s| s.len() <= MAX_STOP_BYTES));
            assert!(fields.sampling().validate().is_ok());
            assert_ne!(fields.max_tokens(), Some(0));
            if let EdgePrompt::Chat(ms) = &prompt {
                assert!(!ms.is_empty() && ms.len() <= MAX_MESSAGES);
            }
            let wire = match prompt.to_wire() {
                Ok(w) => w,
                Err(e) => {
                    assert!(matches!(prompt, EdgePrompt::Tokens(_)));
                    refused(&e);
                    return;
                }
            };
            let req = hypha_node::api::openai::wire_request(
                9,
                &model,
                wire,
                stops,
                json_schema.clone(),
                tools.as_ref(),
                &fields,
            );
            let mut encoder = FrameEncoder::new();
            let Ok(frame) = encoder.encode(&Message::Request(req.clone())) else {
                // Larger than a frame: the consumer's send fails with an error.
                return;
            };
            let Ok((ArchivedMessage::Request(r), _)) = decode_frame(frame) else {
                panic!("a request frame decodes");
            };
            let got = hypha_wire::owned_request(r).expect("a request reads back");
            assert_eq!(got, req, "a request crosses the wire unchanged");
            // The default model's template knows no tools: the generic
            // format, whose grammar holds the whole answer.
            let prepared = prepare(&got, &[model.clone()], ToolFormat::Generic);
            let Prepared {
                input,
                request: generate,
                tool_format,
            } = match prepared {
                Ok(p) => p,
                Err(e) => panic!("the edge took a request the seeder refuses: {}", e.message),
            };
            assert_eq!(tool_format.is_some(), tools.is_some());
            assert_eq!(generate.stop, got.stop);
            assert_eq!(generate.max_tokens, got.max_tokens);
            // A schema the edge took, the seeder turns into a grammar.
            assert_eq!(
                generate.grammar.is_some(),
                json_schema.is_some() || tools.is_some()
            );
            assert_eq!(generate.logprobs, fields.logprobs().unwrap());
            assert_eq!(generate.sampling, fields.sampling());
            assert_eq!(sampling_from_wire(&got.sampling), fields.sampling());
            match (input, prompt) {
                (Input::Chat(a), EdgePrompt::Chat(b)) => assert_eq!(a, b),
                (Input::Tools(a, _), EdgePrompt::Tools(b)) => assert_eq!(a, b),
                (Input::Text(a), EdgePrompt::Text(b)) => assert_eq!(a, b),
                _ => panic!("the prompt changed kind on the way"),
            }
        }
    }
}

/// An error the edge answers with.
fn refused(e: &ApiError) {
    assert!(e.status().is_client_error(), "{:?}", e.status());
    let body = e.body();
    let err = body.get("error").expect("an error body has `error`");
    assert!(err
        .get("message")
        .and_then(Value::as_str)
        .is_some_and(|m| !m.is_empty()));
    assert!(err.get("type").and_then(Value::as_str).is_some());
    assert!(err.get("param").is_some() && err.get("code").is_some());
    // It serializes (what the client receives).
    serde_json::to_vec(&body).expect("an error body serializes");
}

/// A JSON schema of keywords the node enforces, ones it refuses, and
/// values of any shape in their places.
fn schema(u: &mut Unstructured, depth: u32) -> Result<Value> {
    if depth >= MAX_DEPTH {
        return Ok(json!({"type": *u.choose(&["string", "integer", "number", "boolean", "null"])?}));
    }
    Ok(match u.int_in_range(0..=7)? {
        0 => json!({"type": "object", "properties": {"a": schema(u, depth + 1)?, "b": schema(u, depth + 1)?},
                    "required": ["a"], "additionalProperties": u.arbitrary::<bool>()?}),
        1 => json!({"type": "array", "items": schema(u, depth + 1)?,
                    "minItems": number(u)?, "maxItems": number(u)?}),
        2 => json!({"type": "string", "maxLength": number(u)?,
                    "format": *u.choose(&["date", "time", "date-time", "uuid", "email"])?}),
        3 => json!({"type": "integer", "minimum": number(u)?, "maximum": number(u)?}),
        4 => json!({"anyOf": [schema(u, depth + 1)?, schema(u, depth + 1)?]}),
        5 => json!({"enum": [value(u, 2)?, value(u, 2)?], "type": value(u, 2)?}),
        6 => json!({"$ref": "#/$defs/x", "$defs": {"x": schema(u, depth + 1)?}}),
        _ => {
            let mut s = schema(u, depth + 1)?;
            if let Some(o) = s.as_object_mut() {
                o.insert(u.arbitrary()?, value(u, 2)?);
            }
            s
        }
    })
}

/// A JSON value of any shape.
fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let pick = if depth >= MAX_DEPTH {
        u.int_in_range(0..=4)?
    } else {
        u.int_in_range(0..=6)?
    };
    Ok(match pick {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(u.arbitrary::<i64>()?),
        3 => json!(f64::from(u.arbitrary::<f32>()?)),
        4 => Value::String(u.arbitrary()?),
        5 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| value(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=3)?;
            let mut m = Map::new();
            for _ in 0..n {
                m.insert(u.arbitrary()?, value(u, depth + 1)?);
            }
            Value::Object(m)
        }
    })
}

/// A number near the ranges sampling settings take.
fn number(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => json!(u.int_in_range(-3..=3)?),
        1 => json!(f64::from(u.int_in_range(-300..=300)?) / 100.0),
        2 => json!(u.arbitrary::<u32>()?),
        _ => value(u, MAX_DEPTH)?,
    })
}

/// One message of a chat.
fn message(u: &mut Unstructured) -> Result<Value> {
    let role = *u.choose(&["system", "developer", "user", "assistant", "tool", "bogus"])?;
    Ok(match u.int_in_range(0..=4)? {
        0 => json!({"role": role, "content": u.arbitrary::<String>()?}),
        1 => json!({"role": role, "content": [
            {"type": *u.choose(&["text", "image_url"])?, "text": u.arbitrary::<String>()?}
        ]}),
        2 => json!({"role": role}),
        3 => json!({"role": role, "content": Value::Null}),
        4 if u.arbitrary()? => json!({"role": role, "content": Value::Null, "tool_calls": [{
            "id": u.arbitrary::<String>()?, "type": "function",
            "function": {"name": "f0", "arguments": if u.arbitrary()? {
                json!("{\"a\": 1}")
            } else {
                value(u, 1)?
            }}
        }]}),
        4 if u.arbitrary()? => json!({
            "role": role, "content": u.arbitrary::<String>()?, "tool_call_id": value(u, 1)?
        }),
        _ => value(u, 1)?,
    })
}

/// A body with the fields clients send.
fn built(u: &mut Unstructured) -> Result<Value> {
    let mut m = Map::new();
    if u.ratio(15, 16)? {
        m.insert("model".into(), json!(u.arbitrary::<String>()?));
    }
    if u.arbitrary()? {
        let n = if u.ratio(1, 32)? {
            u.int_in_range(0..=MAX_MESSAGES + 1)?
        } else {
            u.int_in_range(0..=3)?
        };
        let ms = (0..n).map(|_| message(u)).collect::<Result<Vec<_>>>()?;
        m.insert("messages".into(), Value::Array(ms));
    } else {
        let prompt = match u.int_in_range(0..=3)? {
            0 => json!(u.arbitrary::<String>()?),
            1 => json!([u.arbitrary::<String>()?]),
            2 => json!(u.arbitrary::<Vec<i32>>()?),
            _ => value(u, 1)?,
        };
        m.insert("prompt".into(), prompt);
    }
    for field in [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "n",
    ] {
        if u.ratio(1, 4)? {
            m.insert(field.into(), number(u)?);
        }
    }
    if u.ratio(1, 4)? {
        let stop = match u.int_in_range(0..=2)? {
            0 => json!(u.arbitrary::<String>()?),
            1 => {
                let n = u.int_in_range(0..=MAX_STOP_STRINGS + 1)?;
                let v = (0..n)
                    .map(|_| {
                        Ok(if u.ratio(1, 8)? {
                            "s".repeat(u.int_in_range(0..=MAX_STOP_BYTES + 1)?)
                        } else {
                            u.arbitrary::<String>()?
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                json!(v)
            }
            _ => value(u, 1)?,
        };
        m.insert("stop".into(), stop);
    }
    for field in ["stream", "echo", "logprobs"] {
        if u.ratio(1, 4)? {
            let v = if u.arbitrary()? {
                Value::Bool(u.arbitrary()?)
            } else {
                value(u, 2)?
            };
            m.insert(field.into(), v);
        }
    }
    if u.ratio(1, 4)? {
        m.insert("top_logprobs".into(), number(u)?);
    }
    if u.ratio(1, 4)? {
        // Structured output: a small schema built from the input, or any
        // value where the format or its schema goes.
        let schema = if u.arbitrary()? {
            schema(u, 0)?
        } else {
            value(u, 2)?
        };
        let format = match u.int_in_range(0..=3)? {
            0 => json!({"type": "json_object"}),
            1 => json!({"type": "text"}),
            2 => json!({"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}),
            _ => value(u, 2)?,
        };
        m.insert("response_format".into(), format);
    }
    if u.ratio(1, 4)? {
        // Tools: functions with schemas built from the input, or any value.
        let tools = if u.ratio(3, 4)? {
            let n = u.int_in_range(0..=3)?;
            let fs = (0..n)
                .map(|i| {
                    Ok(json!({"type": "function", "function": {
                        "name": if u.ratio(7, 8)? { format!("f{i}") } else { u.arbitrary()? },
                        "description": u.arbitrary::<String>()?,
                        "parameters": if u.arbitrary()? { schema(u, 0)? } else { value(u, 1)? },
                    }}))
                })
                .collect::<Result<Vec<_>>>()?;
            Value::Array(fs)
        } else {
            value(u, 2)?
        };
        m.insert("tools".into(), tools);
        if u.arbitrary()? {
            let choice = match u.int_in_range(0..=4)? {
                0 => json!("auto"),
                1 => json!("none"),
                2 => json!("required"),
                3 => json!({"type": "function", "function": {"name": *u.choose(&["f0", "f1", "x"])?}}),
                _ => value(u, 2)?,
            };
            m.insert("tool_choice".into(), choice);
        }
        if u.arbitrary()? {
            m.insert("parallel_tool_calls".into(), value(u, 0)?);
        }
    }
    if u.ratio(1, 8)? {
        m.insert(
            "stream_options".into(),
            json!({"include_usage": value(u, 2)?}),
        );
    }
    if u.ratio(1, 8)? {
        m.insert(u.arbitrary()?, value(u, 0)?);
    }
    Ok(Value::Object(m))
}
