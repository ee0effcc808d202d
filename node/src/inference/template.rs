//! A model's own chat template (the Jinja source in its GGUF), rendered
//! with tools and tool calls in the conversation, as Hugging Face's
//! `apply_chat_template` renders it: blocks trimmed (`trim_blocks`,
//! `lstrip_blocks`), Python's string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps`
//! writes (`", "` and `": "` between items, no HTML escaping, keys in
//! their order), so the prompt is the text the model was trained on.
//!
//! Plain chats (no tools, no calls in the history) keep llama.cpp's own
//! template code; this renders only what that cannot.

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::Value;

use crate::inference::tools::{Message, ToolChat};
use crate::util::unix_ms;

/// Fuel for one rendering: a template's loops are bounded by the
/// conversation, and this stops one that is not (each instruction costs
/// one unit; a conversation of the largest size takes far less).
const RENDER_FUEL: u64 = 50_000_000;

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`.
fn py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(v: JValue, kwargs: Kwargs) -> Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Python's other options change nothing here: keys keep their order
    // and text stays as it is.
    let _: Option<JValue> = kwargs.get("ensure_ascii")?;
    let _: Option<JValue> = kwargs.get("sort_keys")?;
    let _: Option<JValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn raise_exception(message: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, message))
}

/// The civil date of a Unix day count (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Today's date in `fmt`'s `%d %m %b %B %Y %y %%` (what templates ask
/// for); other directives are left as written.
fn strftime_now(fmt: String) -> String {
    let days = i64::try_from(unix_ms() / 86_400_000).unwrap_or(0);
    let (y, m, d) = civil(days);
    let month = MONTHS[(m as usize).saturating_sub(1).min(11)];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A message as templates read it: `tool_calls` only when it has some
/// (templates test `'tool_calls' in message`), each call's arguments as
/// an object, and no content where an assistant only called tools.
fn message_value(m: &Message) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("role".into(), Value::String(m.role.clone()));
    let content = if m.content.is_empty() && !m.tool_calls.is_empty() {
        Value::Null
    } else {
        Value::String(m.content.clone())
    };
    o.insert("content".into(), content);
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_value()},
                })
            })
            .collect();
        o.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &m.tool_call_id {
        o.insert("tool_call_id".into(), Value::String(id.clone()));
    }
    Value::Object(o)
}

/// Renders `chat` with the Jinja `template`, the generation prompt added.
/// The start token is left to the tokenizer (`bos_token` is empty), the
/// end token is `eos`.
pub fn render(template: &str, eos: &str, chat: &ToolChat) -> Result<String, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template("chat", template)
        .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
    let messages: Vec<Value> = chat.messages.iter().map(message_value).collect();
    let tools: Option<Value> = chat
        .tools
        .as_ref()
        .and_then(|t| serde_json::from_str(&t.to_json()).ok());
    let mut ctx = serde_json::json!({
        "messages": messages,
        "add_generation_prompt": true,
        "bos_token": "",
        "eos_token": eos,
    });
    if let Some(t) = tools {
        ctx["tools"] = t;
    }
    env.get_template("chat")
        .and_then(|t| t.render(JValue::from_serialize(&ctx)))
        .map_err(|e| format!("the model's chat template failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_spacing_and_indent() {
        let v: Value = serde_json::from_str(r#"{"b":[1,{"c":"<x>"}],"a":{}}"#).unwrap();
        let mut s = String::new();
        py_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"b": [1, {"c": "<x>"}], "a": {}}"#);
        let mut s = String::new();
        py_json(&v, Some(2), 0, &mut s);
        assert_eq!(
            s,
            "{\n  \"b\": [\n    1,\n    {\n      \"c\": \"<x>\"\n    }\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(20_429), (2025, 12, 7));
    }
}
