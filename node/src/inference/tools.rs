//! Tool calling, alike at the HTTP edge and at a seeder: the tools a chat
//! request offers, checked ([`ToolSet`], one validator for both sides);
//! how a model writes its calls ([`ToolFormat`], told by its chat
//! template); the messages a prompt is made of ([`ToolChat`], rendered by
//! [`crate::inference::template`]); the grammar that holds calls to their
//! functions' schemas ([`grammar`]); and [`Parser`], which reads the calls
//! back out of the generated text as it streams.
//!
//! Formats ([`ToolFormat`]):
//! - Hermes (Qwen and others): `<tool_call>{"name": .., "arguments": ..}</tool_call>`,
//!   one block per call, text before them streams as content;
//! - Llama 3.x: the whole answer is `{"name": .., "parameters": ..}`;
//! - Mistral: `[TOOL_CALLS][{"name": .., "arguments": ..}, ..]` (the
//!   marker is a control token the text may not show);
//! - Generic, for a template that knows no tools (the default test model):
//!   the tools are described in the system message and the answer is one
//!   JSON object, `{"tool_calls": [..]}` or `{"response": ".."}`, always
//!   sampled within its grammar; the response's string streams as content.
//!
//! Grammars: with `tool_choice` `required` or a named function the whole
//! answer keeps to the grammar of the calls, each call's arguments within
//! its function's `parameters` schema (checked by
//! [`crate::inference::schema`], like structured output). With `auto` the
//! text is free until the format's start marker, and from there the calls
//! keep to the grammar (a lazy grammar), so a call the model starts is
//! always well formed.
//!
//! A call the parser cannot read (no grammar held it, or the answer was cut
//! short) comes back as content, never as an error.

use serde_json::{json, Map, Value};

use hypha_engine::{ChatMessage, Grammar};
pub use hypha_wire::ToolFormat;

use crate::inference::schema::{check_schema, grammar_for};

/// Tools one request may offer: more would not fit a small model's
/// context anyway, and each adds a branch to the grammar.
pub const MAX_TOOLS: usize = 128;
/// A function's name: OpenAI's rule (letters, digits, `_` and `-`).
pub const MAX_TOOL_NAME_BYTES: usize = 64;
/// The tools' JSON at most: it is templated into every prompt (agents
/// such as Claude Code send tens of KiB of tool descriptions), and the
/// prompt's own byte bound applies after.
pub const MAX_TOOLS_BYTES: usize = 512 * 1024;
const _: () = assert!(MAX_TOOLS_BYTES < hypha_wire::MAX_FRAME_BYTES / 4);
/// Calls one answer may hold (with `parallel_tool_calls`).
pub const MAX_CALLS: usize = 8;
/// A call's text held back at most while it is read: past this it is
/// released as content (a call's arguments are rarely more than a few
/// KiB; the answer's text is bounded by its tokens anyway).
pub const MAX_CALL_BYTES: usize = 1024 * 1024;
/// The arguments of one call in a request's history at most.
pub const MAX_ARGUMENTS_BYTES: usize = 256 * 1024;
/// A tool call id in a request's history at most.
pub const MAX_CALL_ID_BYTES: usize = 128;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of an object: the call's arguments.
    pub parameters: Value,
}

/// Which calls the request allows or demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Required,
    Named(String),
}

/// The tools of a request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    /// More than one call per answer.
    pub parallel: bool,
}

/// A call in an answer or in a request's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object's text.
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as JSON (their text as a string where it does not
    /// parse), as templates and the generic format write them.
    pub fn arguments_value(&self) -> Value {
        serde_json::from_str(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()))
    }
}

/// A chat message that may call tools or answer a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// One of the roles of [`crate::inference::convert::chat_role`].
    pub role: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
}

/// A chat prompt with tools offered or tool calls in its history.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolChat {
    pub messages: Vec<Message>,
    /// `None` when no tools are offered (`tool_choice: "none"`, or none
    /// sent) but the history holds calls.
    pub tools: Option<ToolSet>,
}

impl ToolChat {
    /// Bytes of text the prompt holds before templating.
    pub fn bytes(&self) -> usize {
        let m: usize = self
            .messages
            .iter()
            .map(|m| {
                m.role.len()
                    + m.content.len()
                    + m.tool_call_id.as_ref().map_or(0, String::len)
                    + m.tool_calls
                        .iter()
                        .map(|c| c.id.len() + c.name.len() + c.arguments.len())
                        .sum::<usize>()
            })
            .sum();
        m + self.tools.as_ref().map_or(0, |t| t.to_json().len())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOOL_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `params` as a function's parameters: an object's schema that the grammar
/// can enforce.
fn check_parameters(params: &Value, at: &str) -> Result<(), String> {
    if !params.is_object() {
        return Err(format!("`{at}` must be a JSON schema object"));
    }
    match params.get("type") {
        None => {}
        Some(t) if t == "object" => {}
        Some(_) => return Err(format!("`{at}` must be the schema of an object")),
    }
    // Annotations count for nothing here: the prompt carries them, the
    // grammar needs none.
    check_schema(&bare(params).to_string())
        .map(|_| ())
        .map_err(|m| format!("`{at}`: {m}"))
}

/// The schema of no arguments.
fn no_parameters() -> Value {
    json!({"type": "object", "properties": {}})
}

impl ToolSet {
    /// OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` fields of
    /// a chat request: `Ok(None)` when no tools are offered (none sent, an
    /// empty list, or `tool_choice: "none"`). An error names the field.
    pub fn from_openai(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<&Value>,
    ) -> Result<Option<Self>, (&'static str, String)> {
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err((
                    "parallel_tool_calls",
                    "`parallel_tool_calls` must be true or false".into(),
                ))
            }
        };
        let list = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(("tools", "`tools` must be an array".into())),
        };
        let choice = match tool_choice {
            None | Some(Value::Null) => Some(Choice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Some(Choice::Auto),
                "none" => None,
                "required" => Some(Choice::Required),
                other => {
                    return Err((
                        "tool_choice",
                        format!(
                            "unknown tool_choice {other:?}: auto, none, required or a function"
                        ),
                    ))
                }
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or((
                        "tool_choice",
                        "a tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}"
                            .to_owned(),
                    ))?;
                Some(Choice::Named(name.to_owned()))
            }
            Some(_) => {
                return Err((
                    "tool_choice",
                    "`tool_choice` must be a string or an object".into(),
                ))
            }
        };
        if list.is_empty() {
            return match choice {
                None | Some(Choice::Auto) => Ok(None),
                Some(_) => Err((
                    "tool_choice",
                    "tool_choice asks for a call but no tools are given".into(),
                )),
            };
        }
        let Some(choice) = choice else {
            return Ok(None);
        };
        let set = Self {
            tools: parse_tools(&list).map_err(|m| ("tools", m))?,
            choice,
            parallel,
        };
        set.check().map_err(|m| ("tools", m))?;
        Ok(Some(set))
    }

    /// The checks both sides run: bounds, unique names, a named choice
    /// among them, and that the calls' grammar can be made.
    pub fn check(&self) -> Result<(), String> {
        if self.tools.is_empty() {
            return Err("no tools are given".into());
        }
        if self.tools.len() > MAX_TOOLS {
            return Err(format!("at most {MAX_TOOLS} tools are allowed"));
        }
        let bytes = self.to_json().len();
        if bytes > MAX_TOOLS_BYTES {
            return Err(format!(
                "the tools are {bytes} bytes of JSON; at most {MAX_TOOLS_BYTES} are allowed"
            ));
        }
        for (i, t) in self.tools.iter().enumerate() {
            if !valid_name(&t.name) {
                return Err(format!(
                    "tools[{i}].function.name must be 1 to {MAX_TOOL_NAME_BYTES} letters, digits, _ or -"
                ));
            }
            if self.tools[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("two tools are named {:?}", t.name));
            }
            check_parameters(&t.parameters, &format!("tools[{i}].function.parameters"))?;
        }
        if let Choice::Named(n) = &self.choice {
            if !self.tools.iter().any(|t| &t.name == n) {
                return Err(format!(
                    "tool_choice names {n:?}, which is not among the tools"
                ));
            }
        }
        // The grammar of every call at once must be one the converter takes.
        check_schema(&calls_schema(self, "arguments").to_string())
            .map(|_| ())
            .map_err(|m| format!("the tools' schemas together: {m}"))
    }

    /// The tools as OpenAI's JSON array.
    pub fn to_json(&self) -> String {
        Value::Array(self.tools.iter().map(tool_json).collect()).to_string()
    }

    /// The wire form.
    pub fn to_wire(&self) -> hypha_wire::Tools {
        let (choice, named) = match &self.choice {
            Choice::Auto => (hypha_wire::ToolChoice::Auto, String::new()),
            Choice::Required => (hypha_wire::ToolChoice::Required, String::new()),
            Choice::Named(n) => (hypha_wire::ToolChoice::Named, n.clone()),
        };
        hypha_wire::Tools {
            tools_json: self.to_json(),
            choice,
            named,
            parallel: self.parallel,
        }
    }

    /// From the wire, checked as the edge checks.
    pub fn from_wire(t: &hypha_wire::Tools) -> Result<Self, String> {
        if t.tools_json.len() > MAX_TOOLS_BYTES {
            return Err(format!("at most {MAX_TOOLS_BYTES} bytes of tools"));
        }
        let list: Vec<Value> =
            serde_json::from_str(&t.tools_json).map_err(|e| format!("tools do not parse: {e}"))?;
        let choice = match t.choice {
            hypha_wire::ToolChoice::Auto => Choice::Auto,
            hypha_wire::ToolChoice::Required => Choice::Required,
            hypha_wire::ToolChoice::Named => Choice::Named(t.named.clone()),
        };
        let set = Self {
            tools: parse_tools(&list)?,
            choice,
            parallel: t.parallel,
        };
        set.check()?;
        Ok(set)
    }

    /// The tools a call may name: all, or the named one.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|t| match &self.choice {
            Choice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// Calls one answer may hold.
    fn max_calls(&self) -> usize {
        if self.parallel {
            MAX_CALLS
        } else {
            1
        }
    }
}

fn tool_json(t: &Tool) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), Value::String(t.name.clone()));
    if let Some(d) = &t.description {
        f.insert("description".into(), Value::String(d.clone()));
    }
    f.insert("parameters".into(), t.parameters.clone());
    json!({"type": "function", "function": f})
}

/// OpenAI's tool objects, each checked for its shape.
fn parse_tools(list: &[Value]) -> Result<Vec<Tool>, String> {
    if list.len() > MAX_TOOLS {
        return Err(format!("at most {MAX_TOOLS} tools are allowed"));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let obj = t
                .as_object()
                .ok_or_else(|| format!("tools[{i}] must be an object"))?;
            if let Some(k) = obj.keys().find(|k| *k != "type" && *k != "function") {
                return Err(format!("unsupported field `{k}` in tools[{i}]"));
            }
            match obj.get("type").and_then(Value::as_str) {
                Some("function") => {}
                _ => {
                    return Err(format!(
                        "tools[{i}].type must be \"function\": only functions are served"
                    ))
                }
            }
            let f = obj
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("tools[{i}].function must be an object"))?;
            const FIELDS: [&str; 4] = ["name", "description", "parameters", "strict"];
            if let Some(k) = f.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                return Err(format!("unsupported field `{k}` in tools[{i}].function"));
            }
            // `strict` asks that arguments keep to the schema: they always
            // do where a grammar holds the call, and it is checked above
            // that one can.
            if f.get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return Err(format!("tools[{i}].function.strict must be true or false"));
            }
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("tools[{i}].function.name must be a string"))?;
            let description = match f.get("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(format!("tools[{i}].function.description must be a string")),
            };
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => no_parameters(),
                Some(p) => p.clone(),
            };
            Ok(Tool {
                name: name.to_owned(),
                description,
                parameters,
            })
        })
        .collect()
}

/// How a model with chat template `template` writes calls.
pub fn format_of_template(template: Option<&str>) -> ToolFormat {
    let Some(t) = template else {
        return ToolFormat::Generic;
    };
    if t.contains("<tool_call>") {
        ToolFormat::Hermes
    } else if t.contains("[TOOL_CALLS]") {
        ToolFormat::Mistral
    } else if t.contains("<|start_header_id|>") && t.contains("tools") {
        ToolFormat::Llama3
    } else {
        ToolFormat::Generic
    }
}

/// The key a call's arguments are written under in `format`.
fn arguments_key(format: ToolFormat) -> &'static str {
    match format {
        ToolFormat::Llama3 => "parameters",
        _ => "arguments",
    }
}

/// Keywords of a schema that enforce nothing (see `schema`'s).
const ANNOTATIONS: [&str; 6] = [
    "title",
    "description",
    "examples",
    "default",
    "$comment",
    "$schema",
];

/// `schema` without its annotations, which the grammar does not need
/// (clients' tools carry long descriptions, which the prompt has).
fn bare(schema: &Value) -> Value {
    let Some(o) = schema.as_object() else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (k, v) in o {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        let v = match k.as_str() {
            "properties" | "$defs" | "definitions" => match v.as_object() {
                Some(m) => Value::Object(m.iter().map(|(n, s)| (n.clone(), bare(s))).collect()),
                None => v.clone(),
            },
            "items" | "additionalProperties" | "not" => bare(v),
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => match v.as_array() {
                Some(a) => Value::Array(a.iter().map(bare).collect()),
                None => v.clone(),
            },
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// The schema of one call of any callable tool: `{"name": .., KEY: ..}`.
fn calls_schema(set: &ToolSet, key: &str) -> Value {
    let calls: Vec<Value> = set
        .callable()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, key: bare(&t.parameters)},
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(many) => json!({"anyOf": many}),
    }
}

/// The generic format's schema: the calls, or (with `auto`) an answer.
fn generic_schema(set: &ToolSet) -> Value {
    let mut list = json!({"type": "array", "items": calls_schema(set, "arguments"), "minItems": 1});
    list["maxItems"] = json!(set.max_calls());
    let calls = json!({
        "type": "object",
        "properties": {"tool_calls": list},
        "required": ["tool_calls"],
        "additionalProperties": false,
    });
    match set.choice {
        Choice::Auto => json!({"anyOf": [
            {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": false,
            },
            calls,
        ]}),
        _ => calls,
    }
}

/// `schema`'s grammar with its root rule renamed `name`, to be used
/// inside another grammar.
fn sub_grammar(schema: &Value, name: &str) -> Result<String, String> {
    let g = grammar_for(&schema.to_string())?;
    let mut out = String::with_capacity(g.len() + 16);
    let mut renamed = false;
    for line in g.lines() {
        match line.strip_prefix("root ::=") {
            Some(rest) if !renamed => {
                renamed = true;
                out.push_str(name);
                out.push_str(" ::=");
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if !renamed {
        return Err("the converter's grammar has no root rule".into());
    }
    Ok(out)
}

/// The grammar calls keep to in `format`, or `None` when nothing needs
/// one.
pub fn grammar(set: &ToolSet, format: ToolFormat) -> Result<Grammar, String> {
    let more = set.max_calls() - 1;
    let lazy = matches!(set.choice, Choice::Auto);
    let (gbnf, trigger) = match format {
        ToolFormat::Generic => {
            return grammar_for(&generic_schema(set).to_string()).map(Grammar::whole);
        }
        ToolFormat::Hermes => {
            let call = sub_grammar(&calls_schema(set, "arguments"), "tool-call")?;
            let block = r#""<tool_call>" [ \n]{0,2} tool-call [ \n]{0,2} "</tool_call>""#;
            (
                format!("{call}root ::= {block} ([ \\n]{{0,2}} {block}){{0,{more}}}\n"),
                "<tool_call>",
            )
        }
        ToolFormat::Llama3 => {
            let call = sub_grammar(&calls_schema(set, "parameters"), "tool-call")?;
            (format!("{call}root ::= tool-call\n"), "{\"name\"")
        }
        ToolFormat::Mistral => {
            let call = sub_grammar(&calls_schema(set, "arguments"), "tool-call")?;
            (
                format!(
                    "{call}root ::= \"[TOOL_CALLS]\" \" \"? \"[\" tool-call (\", \" tool-call){{0,{more}}} \"]\"\n"
                ),
                "[TOOL_CALLS]",
            )
        }
    };
    Ok(Grammar {
        gbnf,
        lazy_trigger: lazy.then(|| trigger.to_owned()),
    })
}

/// The system text that offers tools to a model whose template knows none
/// (the generic format).
pub fn generic_instructions(set: &ToolSet) -> String {
    let tools: Vec<Value> = set
        .callable()
        .map(|t| {
            let mut f = Map::new();
            f.insert("name".into(), Value::String(t.name.clone()));
            if let Some(d) = &t.description {
                f.insert("description".into(), Value::String(d.clone()));
            }
            f.insert("parameters".into(), t.parameters.clone());
            Value::Object(f)
        })
        .collect();
    let calls = if set.parallel {
        "one or more tool calls"
    } else {
        "exactly one tool call"
    };
    let form = r#"{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments>}}]}"#;
    let how = match &set.choice {
        Choice::Auto => format!(
            "Answer with one JSON object: either {form} to make {calls}, or {{\"response\": \"<your answer>\"}} to answer directly."
        ),
        Choice::Required => format!("Answer with one JSON object that makes {calls}: {form}"),
        Choice::Named(n) => {
            format!("Answer with one JSON object that calls the tool {n:?}: {form}")
        }
    };
    format!(
        "You can call these tools:\n{}\n\n{how}",
        Value::Array(tools)
    )
}

/// Messages for a template that knows no tools (the generic format):
/// the tools described in the system message, calls in the history
/// written as the JSON the model answers with, tool results as user
/// messages.
pub fn generic_messages(chat: &ToolChat) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(chat.messages.len() + 1);
    let mut rest = chat.messages.as_slice();
    if let Some(set) = &chat.tools {
        let preamble = generic_instructions(set);
        match rest.first() {
            Some(first) if first.role == "system" => {
                out.push(ChatMessage {
                    role: "system".into(),
                    content: format!("{}\n\n{preamble}", first.content),
                });
                rest = &rest[1..];
            }
            _ => out.push(ChatMessage {
                role: "system".into(),
                content: preamble,
            }),
        }
    }
    for m in rest {
        let (role, content) = if !m.tool_calls.is_empty() {
            let calls: Vec<Value> = m
                .tool_calls
                .iter()
                .map(|c| json!({"name": c.name, "arguments": c.arguments_value()}))
                .collect();
            ("assistant", json!({"tool_calls": calls}).to_string())
        } else if m.role == "tool" {
            let id = m.tool_call_id.clone().unwrap_or_default();
            (
                "user",
                json!({"tool_response": {"tool_call_id": id, "content": m.content}}).to_string(),
            )
        } else {
            (m.role.as_str(), m.content.clone())
        };
        out.push(ChatMessage {
            role: role.to_owned(),
            content,
        });
    }
    out
}

/// A piece of an answer read by [`Parser`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text for the client.
    Text(String),
    /// A call, its arguments a JSON object's compact text.
    Call { name: String, arguments: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing but white space yet: the format's opening decides.
    Opening,
    /// Content streams; a start marker may come.
    Text,
    /// Calls are being read, held until they are whole.
    Held,
    /// The generic format's `response` string streams.
    Response,
    /// Nothing more is read (after the generic response's string).
    Over,
}

/// Reads calls out of generated text as it streams (see the module
/// docs for the formats). Text that is no readable call comes out as
/// text.
#[derive(Debug)]
pub struct Parser {
    format: ToolFormat,
    names: Vec<String>,
    max_calls: usize,
    calls: usize,
    mode: Mode,
    buf: String,
    /// Bytes of `buf` already searched for a Hermes block's end: a long
    /// call is scanned once, not again with every piece of it.
    scanned: usize,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";

/// The length of the longest suffix of `s` that begins `marker` (at a
/// character boundary).
fn partial_suffix(s: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(s.len());
    (1..=max)
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// How far `s` is into the generic response's opening,
/// `{ "response" : "` with white space anywhere between.
enum Opening {
    /// Its opening ends at this byte: the string's text follows.
    Full(usize),
    /// It may still become one.
    Partial,
    No,
}

fn response_opening(s: &str) -> Opening {
    let parts = ["{", "\"response\"", ":", "\""];
    let b = s.as_bytes();
    let mut i = 0;
    for p in parts {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let rest = &s[i..];
        if rest.len() < p.len() {
            return if p.starts_with(rest) {
                Opening::Partial
            } else {
                Opening::No
            };
        }
        if !rest.starts_with(p) {
            return Opening::No;
        }
        i += p.len();
    }
    Opening::Full(i)
}

/// Decodes the JSON string text at the start of `s` up to its closing
/// quote or to where an escape is cut: the text, the bytes used, and
/// whether the closing quote came.
fn json_string_prefix(s: &str) -> (String, usize, bool) {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => return (out, i + 1, true),
            b'\\' => {
                let Some(&e) = b.get(i + 1) else {
                    break;
                };
                let simple = match e {
                    b'"' => Some('"'),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    _ => None,
                };
                if let Some(c) = simple {
                    out.push(c);
                    i += 2;
                    continue;
                }
                if e != b'u' {
                    // Not JSON: stop reading the string here.
                    return (out, b.len(), true);
                }
                // `\uXXXX`, or a surrogate pair `\uXXXX\uXXXX`.
                let hex = |at: usize| {
                    s.get(at..at + 4)
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                };
                let Some(hi) = hex(i + 2) else {
                    if b.len() < i + 6 {
                        break;
                    }
                    return (out, b.len(), true);
                };
                if (0xD800..0xDC00).contains(&hi) {
                    if b.len() < i + 12 {
                        break;
                    }
                    let lo = if &s[i + 6..i + 8] == "\\u" {
                        hex(i + 8)
                    } else {
                        None
                    };
                    match lo {
                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                            i += 12;
                        }
                        _ => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            i += 6;
                        }
                    }
                } else {
                    out.push(char::from_u32(hi).unwrap_or(char::REPLACEMENT_CHARACTER));
                    i += 6;
                }
            }
            _ => {
                // A whole character (the input is a str: boundaries hold).
                let c = s[i..].chars().next().unwrap_or(char::REPLACEMENT_CHARACTER);
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    (out, i, false)
}

impl Parser {
    pub fn new(format: ToolFormat, set: &ToolSet) -> Self {
        Self {
            format,
            names: set.callable().map(|t| t.name.clone()).collect(),
            max_calls: set.max_calls(),
            calls: 0,
            mode: Mode::Opening,
            buf: String::new(),
            scanned: 0,
        }
    }

    /// The pieces `text` (more of the answer) completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        self.buf.push_str(text);
        self.step(&mut out);
        if self.mode == Mode::Held && self.buf.len() > MAX_CALL_BYTES {
            // Too long to be a call: the rest is text.
            self.mode = Mode::Text;
            out.push(Piece::Text(std::mem::take(&mut self.buf)));
        }
        out
    }

    /// The pieces left when the answer ends.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.step(&mut out);
        let rest = std::mem::take(&mut self.buf);
        match self.mode {
            Mode::Held => self.read_calls(&rest, &mut out),
            Mode::Response | Mode::Over => {}
            Mode::Opening | Mode::Text => {
                if !rest.is_empty() {
                    out.push(Piece::Text(rest));
                }
            }
        }
        self.mode = Mode::Over;
        out
    }

    fn step(&mut self, out: &mut Vec<Piece>) {
        loop {
            match self.mode {
                Mode::Opening => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        return;
                    }
                    self.mode = match self.format {
                        ToolFormat::Generic => match response_opening(&self.buf) {
                            Opening::Full(at) => {
                                self.buf.drain(..at);
                                Mode::Response
                            }
                            Opening::Partial => return,
                            Opening::No => Mode::Held,
                        },
                        ToolFormat::Llama3 if t.starts_with('{') => Mode::Held,
                        ToolFormat::Mistral if t.starts_with('[') => Mode::Held,
                        ToolFormat::Mistral if MISTRAL_OPEN.starts_with(t) => return,
                        _ => Mode::Text,
                    };
                }
                Mode::Text => {
                    let marker = match self.format {
                        ToolFormat::Hermes => HERMES_OPEN,
                        ToolFormat::Mistral => MISTRAL_OPEN,
                        _ => {
                            if !self.buf.is_empty() {
                                out.push(Piece::Text(std::mem::take(&mut self.buf)));
                            }
                            return;
                        }
                    };
                    if self.calls >= self.max_calls {
                        if !self.buf.is_empty() {
                            out.push(Piece::Text(std::mem::take(&mut self.buf)));
                        }
                        return;
                    }
                    if let Some(at) = self.buf.find(marker) {
                        if at > 0 {
                            out.push(Piece::Text(self.buf[..at].to_owned()));
                        }
                        self.buf.drain(..at);
                        self.mode = Mode::Held;
                        self.scanned = 0;
                        continue;
                    }
                    let keep = partial_suffix(&self.buf, marker);
                    let cut = self.buf.len() - keep;
                    if cut > 0 {
                        out.push(Piece::Text(self.buf[..cut].to_owned()));
                        self.buf.drain(..cut);
                    }
                    return;
                }
                Mode::Held => {
                    if self.format != ToolFormat::Hermes {
                        // The rest of the answer is the calls: read at the end.
                        return;
                    }
                    // A block, white space before one, or text again.
                    let t = self.buf.trim_start();
                    if t.is_empty() || HERMES_OPEN.starts_with(t) {
                        return;
                    }
                    if !t.starts_with(HERMES_OPEN) {
                        self.mode = Mode::Text;
                        continue;
                    }
                    // Where a marker could end that was not seen yet.
                    let mut from = self.scanned.saturating_sub(HERMES_CLOSE.len() - 1);
                    while !self.buf.is_char_boundary(from) {
                        from -= 1;
                    }
                    let Some(end) = self.buf[from..].find(HERMES_CLOSE).map(|at| from + at) else {
                        self.scanned = self.buf.len();
                        return;
                    };
                    let block = self.buf[..end + HERMES_CLOSE.len()].to_owned();
                    self.buf.drain(..block.len());
                    self.scanned = 0;
                    self.read_calls(&block, out);
                    if self.calls >= self.max_calls {
                        self.mode = Mode::Text;
                    }
                }
                Mode::Response => {
                    let (text, used, closed) = json_string_prefix(&self.buf);
                    self.buf.drain(..used);
                    if !text.is_empty() {
                        out.push(Piece::Text(text));
                    }
                    if closed {
                        self.mode = Mode::Over;
                        self.buf.clear();
                    }
                    return;
                }
                Mode::Over => {
                    self.buf.clear();
                    return;
                }
            }
        }
    }

    /// Reads held text as calls: every call in it, or all of it as text.
    fn read_calls(&mut self, held: &str, out: &mut Vec<Piece>) {
        if held.trim().is_empty() {
            return;
        }
        match self.calls_in(held) {
            Some(pieces) => {
                let calls = pieces
                    .iter()
                    .filter(|p| matches!(p, Piece::Call { .. }))
                    .count();
                if self.calls + calls <= self.max_calls {
                    self.calls += calls;
                    out.extend(pieces);
                } else {
                    out.push(Piece::Text(held.to_owned()));
                }
            }
            None => out.push(Piece::Text(held.to_owned())),
        }
    }

    /// The calls `held` holds in this format, each naming a callable tool
    /// with an object of arguments; `None` when it is anything else.
    fn calls_in(&self, held: &str) -> Option<Vec<Piece>> {
        let t = held.trim();
        let key = arguments_key(self.format);
        let list: Vec<Value> = match self.format {
            ToolFormat::Hermes => {
                let inner = t.strip_prefix(HERMES_OPEN)?;
                let inner = inner.strip_suffix(HERMES_CLOSE).unwrap_or(inner);
                vec![serde_json::from_str(inner.trim()).ok()?]
            }
            ToolFormat::Llama3 => vec![serde_json::from_str(t).ok()?],
            ToolFormat::Mistral => {
                let inner = t.strip_prefix(MISTRAL_OPEN).unwrap_or(t);
                serde_json::from_str(inner.trim()).ok()?
            }
            ToolFormat::Generic => {
                let v: Value = serde_json::from_str(t).ok()?;
                if let Some(r) = v.get("response").and_then(Value::as_str) {
                    let only = v.as_object().is_some_and(|o| o.len() == 1);
                    return only.then(|| vec![Piece::Text(r.to_owned())]);
                }
                v.get("tool_calls")?.as_array()?.clone()
            }
        };
        if list.is_empty() {
            return None;
        }
        list.iter()
            .map(|c| {
                let name = c.get("name")?.as_str()?;
                if !self.names.iter().any(|n| n == name) {
                    return None;
                }
                let args = match c.get(key).or_else(|| c.get("arguments"))? {
                    Value::String(s) => serde_json::from_str::<Value>(s).ok()?,
                    v => v.clone(),
                };
                args.is_object().then(|| Piece::Call {
                    name: name.to_owned(),
                    arguments: args.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::template::render;

    const QWEN: &str = include_str!("../../tests/templates/qwen2.5-instruct.jinja");
    const LLAMA: &str = include_str!("../../tests/templates/llama-3.2-instruct.jinja");
    const MISTRAL: &str = include_str!("../../tests/templates/mistral-nemo-instruct-2407.jinja");
    /// SmolLM2-135M-Instruct's template (the default model): no tools.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn weather(choice: Choice, parallel: bool) -> ToolSet {
        let tools = json!([
            {"type": "function", "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["c", "f"]}
                }, "required": ["city"]}
            }},
            {"type": "function", "function": {"name": "get_time"}}
        ]);
        let mut set = ToolSet::from_openai(Some(&tools), None, None)
            .unwrap()
            .unwrap();
        set.choice = choice;
        set.parallel = parallel;
        set
    }

    fn feed(p: &mut Parser, pieces: &[&str]) -> Vec<Piece> {
        let mut out: Vec<Piece> = pieces.iter().flat_map(|s| p.push(s)).collect();
        out.extend(p.finish());
        // Adjacent text pieces joined, to compare what a client sees.
        let mut joined: Vec<Piece> = Vec::new();
        for piece in out {
            match (joined.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => joined.push(p),
            }
        }
        joined
    }

    fn call(name: &str, args: &str) -> Piece {
        Piece::Call {
            name: name.into(),
            arguments: args.into(),
        }
    }

    fn text(t: &str) -> Piece {
        Piece::Text(t.into())
    }

    /// Splits `s` into pieces of `n` characters, as tokens would come.
    fn chunks(s: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = s.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    #[test]
    fn formats_from_real_templates() {
        assert_eq!(format_of_template(Some(QWEN)), ToolFormat::Hermes);
        assert_eq!(format_of_template(Some(LLAMA)), ToolFormat::Llama3);
        assert_eq!(format_of_template(Some(MISTRAL)), ToolFormat::Mistral);
        assert_eq!(format_of_template(Some(SMOLLM2)), ToolFormat::Generic);
        assert_eq!(format_of_template(None), ToolFormat::Generic);
    }

    #[test]
    fn hermes_calls_split_across_chunks() {
        // Qwen2.5's answer, as the model writes it.
        let answer = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        for n in [1, 2, 3, 7, 1000] {
            let mut p = Parser::new(ToolFormat::Hermes, &weather(Choice::Auto, true));
            let pieces: Vec<String> = chunks(answer, n);
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(
                feed(&mut p, &refs),
                vec![
                    text("Let me look.\n"),
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("get_time", "{}"),
                ],
                "chunks of {n}"
            );
        }
    }

    #[test]
    fn hermes_text_streams_before_a_call_is_whole() {
        let mut p = Parser::new(ToolFormat::Hermes, &weather(Choice::Auto, true));
        assert_eq!(p.push("Hello <tool"), vec![text("Hello ")]);
        assert_eq!(p.push("s> are <"), vec![text("<tools> are ")]);
        assert_eq!(p.push("b>"), vec![text("<b>")]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn hermes_malformed_calls_come_back_as_text() {
        let cases = [
            // Not JSON.
            "<tool_call>\n{\"name\": get_weather}\n</tool_call>",
            // A function that is not offered.
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            // Arguments that are no object.
            "<tool_call>{\"name\": \"get_time\", \"arguments\": [1]}</tool_call>",
            // Cut short.
            "<tool_call>{\"name\": \"get_time\", \"argu",
        ];
        for c in cases {
            let mut p = Parser::new(ToolFormat::Hermes, &weather(Choice::Auto, true));
            assert_eq!(feed(&mut p, &[c]), vec![text(c)], "{c}");
        }
        // A call the model did not close before it ended still counts.
        let mut p = Parser::new(ToolFormat::Hermes, &weather(Choice::Auto, true));
        assert_eq!(
            feed(
                &mut p,
                &["<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n"]
            ),
            vec![call("get_time", "{}")]
        );
    }

    #[test]
    fn one_call_only_without_parallel_calls() {
        let two = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let mut p = Parser::new(ToolFormat::Hermes, &weather(Choice::Auto, false));
        assert_eq!(
            feed(&mut p, &[two]),
            vec![
                call("get_time", "{}"),
                text("<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>")
            ]
        );
    }

    #[test]
    fn named_choice_admits_only_that_function() {
        let set = weather(Choice::Named("get_time".into()), true);
        let mut p = Parser::new(ToolFormat::Hermes, &set);
        let c =
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"x\"}}</tool_call>";
        assert_eq!(feed(&mut p, &[c]), vec![text(c)]);
    }

    #[test]
    fn llama3_whole_answer_is_the_call() {
        // Llama 3.2's answer to a custom tool.
        let answer =
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"unit\": \"c\"}}";
        let mut p = Parser::new(ToolFormat::Llama3, &weather(Choice::Auto, true));
        let pieces = chunks(answer, 3);
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(
            feed(&mut p, &refs),
            vec![call("get_weather", r#"{"city":"Paris","unit":"c"}"#)]
        );
        let mut p = Parser::new(ToolFormat::Llama3, &weather(Choice::Auto, true));
        assert_eq!(p.push("The weather"), vec![text("The weather")]);
        assert_eq!(p.push(" is {fine}"), vec![text(" is {fine}")]);
        let mut p = Parser::new(ToolFormat::Llama3, &weather(Choice::Auto, true));
        assert_eq!(feed(&mut p, &["{\"a\": 1}"]), vec![text("{\"a\": 1}")]);
    }

    #[test]
    fn mistral_calls_with_and_without_the_marker() {
        // Mistral Nemo's answer; the marker is a control token whose text
        // the engine may not show.
        let answer = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abcdefghi\"}, {\"name\": \"get_time\", \"arguments\": {}}]";
        for a in [answer, &answer["[TOOL_CALLS]".len()..]] {
            let mut p = Parser::new(ToolFormat::Mistral, &weather(Choice::Auto, true));
            let pieces = chunks(a, 4);
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(
                feed(&mut p, &refs),
                vec![
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("get_time", "{}")
                ]
            );
        }
        let mut p = Parser::new(ToolFormat::Mistral, &weather(Choice::Auto, true));
        assert_eq!(
            feed(
                &mut p,
                &[
                    "Sure.",
                    " [TOOL_",
                    "CALLS][{\"name\": \"get_time\", \"arguments\": {}}]"
                ]
            ),
            vec![text("Sure. "), call("get_time", "{}")]
        );
    }

    #[test]
    fn generic_response_streams_and_calls_are_read() {
        let set = weather(Choice::Auto, true);
        let answer = "{ \"response\": \"Hi \\\"you\\\" \\u00e9\\ud83d\\ude00\\n\" }";
        for n in [1, 2, 5, 100] {
            let mut p = Parser::new(ToolFormat::Generic, &set);
            let pieces = chunks(answer, n);
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(
                feed(&mut p, &refs),
                vec![text("Hi \"you\" é😀\n")],
                "chunks of {n}"
            );
        }
        let mut p = Parser::new(ToolFormat::Generic, &set);
        let mut got = p.push("{\"response\": \"Hel");
        got.extend(p.push("lo"));
        assert_eq!(got, vec![text("Hel"), text("lo")], "text streams");
        let calls =
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]}";
        let mut p = Parser::new(ToolFormat::Generic, &set);
        assert_eq!(
            feed(&mut p, &[calls]),
            vec![call("get_weather", r#"{"city":"Oslo"}"#)]
        );
        // Cut short inside the calls: the text, as it came.
        let mut p = Parser::new(ToolFormat::Generic, &set);
        assert_eq!(
            feed(&mut p, &["{\"tool_calls\": [{\"na"]),
            vec![text("{\"tool_calls\": [{\"na")]
        );
    }

    #[test]
    fn tool_sets_are_checked() {
        let bad = |tools: Value, choice: Option<Value>| {
            ToolSet::from_openai(Some(&tools), choice.as_ref(), None).unwrap_err()
        };
        let f = |name: &str| json!({"type": "function", "function": {"name": name}});
        assert_eq!(bad(json!([f("a b")]), None).0, "tools");
        assert_eq!(bad(json!([f("a"), f("a")]), None).0, "tools");
        assert_eq!(bad(json!([{"type": "code_interpreter"}]), None).0, "tools");
        assert_eq!(
            bad(
                json!([f("a")]),
                Some(json!({"type": "function", "function": {"name": "b"}}))
            )
            .0,
            "tools"
        );
        assert_eq!(
            bad(json!([f("a")]), Some(json!("sometimes"))).0,
            "tool_choice"
        );
        let pattern = json!([{"type": "function", "function": {"name": "a",
            "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}}}]);
        assert!(bad(pattern, None).1.contains("pattern"));
        // `none` offers nothing; so does an empty list.
        assert_eq!(
            ToolSet::from_openai(Some(&json!([f("a")])), Some(&json!("none")), None),
            Ok(None)
        );
        assert_eq!(ToolSet::from_openai(Some(&json!([])), None, None), Ok(None));
        // The wire form reads back the same.
        let set = weather(Choice::Named("get_time".into()), false);
        assert_eq!(ToolSet::from_wire(&set.to_wire()), Ok(set));
    }

    #[test]
    fn the_grammar_schema_leaves_annotations_out() {
        let long = "d".repeat(40 * 1024);
        let tools = json!([{"type": "function", "function": {"name": "f", "description": long,
        "parameters": {"type": "object", "description": long, "properties": {
            "description": {"type": "string", "description": long},
            "n": {"anyOf": [{"type": "integer", "title": "N"}, {"type": "null"}]}
        }}}}]);
        let set = ToolSet::from_openai(Some(&tools), None, None)
            .unwrap()
            .unwrap();
        let schema = calls_schema(&set, "arguments");
        assert_eq!(
            schema["properties"]["arguments"],
            json!({"type": "object", "properties": {
                "description": {"type": "string"},
                "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
            }})
        );
    }

    #[test]
    fn grammars_of_every_format_are_made() {
        for choice in [
            Choice::Auto,
            Choice::Required,
            Choice::Named("get_weather".into()),
        ] {
            let set = weather(choice.clone(), true);
            for f in [
                ToolFormat::Generic,
                ToolFormat::Hermes,
                ToolFormat::Llama3,
                ToolFormat::Mistral,
            ] {
                let g = grammar(&set, f).unwrap();
                assert!(g.gbnf.contains("root ::="), "{f:?}");
                assert_eq!(g.gbnf.matches("root ::=").count(), 1, "{f:?}: {}", g.gbnf);
                let lazy = choice == Choice::Auto && f != ToolFormat::Generic;
                assert_eq!(g.lazy_trigger.is_some(), lazy, "{f:?} {choice:?}");
            }
        }
    }

    fn conversation(tools: Option<ToolSet>, id: &str) -> ToolChat {
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        };
        ToolChat {
            messages: vec![
                m("system", "Be brief."),
                m("user", "Weather in Paris?"),
                Message {
                    tool_calls: vec![ToolCall {
                        id: id.into(),
                        name: "get_weather".into(),
                        arguments: r#"{"city": "Paris"}"#.into(),
                    }],
                    ..m("assistant", "")
                },
                Message {
                    tool_call_id: Some(id.into()),
                    ..m("tool", "21 C")
                },
            ],
            tools,
        }
    }

    #[test]
    fn real_templates_render_tools_and_history() {
        let set = weather(Choice::Auto, true);
        let qwen = render(
            QWEN,
            "<|im_end|>",
            &conversation(Some(set.clone()), "call_1"),
        )
        .unwrap();
        assert!(
            qwen.starts_with("<|im_start|>system\nBe brief.\n\n# Tools"),
            "{qwen}"
        );
        assert!(qwen.contains(r#"{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}"#), "{qwen}");
        assert!(qwen.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"), "{qwen}");
        assert!(
            qwen.contains("<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n"),
            "{qwen}"
        );
        assert!(qwen.ends_with("<|im_start|>assistant\n"), "{qwen}");

        let llama = render(
            LLAMA,
            "<|eot_id|>",
            &conversation(Some(set.clone()), "call_1"),
        )
        .unwrap();
        assert!(llama.starts_with("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\nToday Date: "), "{llama}");
        assert!(
            llama.contains("\"name\": \"get_weather\",\n        \"description\""),
            "indented tools: {llama}"
        );
        assert!(llama.contains("<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"), "{llama}");
        // A string is iterable to Jinja, so the template writes it as JSON.
        assert!(
            llama.contains("<|start_header_id|>ipython<|end_header_id|>\n\n\"21 C\"<|eot_id|>"),
            "{llama}"
        );

        let mistral = render(
            MISTRAL,
            "</s>",
            &conversation(Some(set.clone()), "abcdefghi"),
        )
        .unwrap();
        assert!(mistral.contains("[AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""), "{mistral}");
        assert!(mistral.contains("[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abcdefghi\"}]</s>"), "{mistral}");
        assert!(
            mistral.contains(
                "[TOOL_RESULTS]{\"content\": 21 C, \"call_id\": \"abcdefghi\"}[/TOOL_RESULTS]"
            ),
            "{mistral}"
        );
        // The template's own check of the ids it wants, as a clear error.
        let err = render(MISTRAL, "</s>", &conversation(Some(set), "call_1")).unwrap_err();
        assert!(err.contains("length 9"), "{err}");
    }

    #[test]
    fn generic_messages_describe_the_tools() {
        let set = weather(Choice::Required, false);
        let ms = generic_messages(&conversation(Some(set), "call_1"));
        assert_eq!(ms.len(), 4);
        assert!(
            ms[0]
                .content
                .starts_with("Be brief.\n\nYou can call these tools:\n[{\"name\":\"get_weather\""),
            "{}",
            ms[0].content
        );
        assert!(ms[0].content.contains("exactly one tool call"));
        assert_eq!(ms[2].role, "assistant");
        assert_eq!(
            ms[2].content,
            r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}"#
        );
        assert_eq!(ms[3].role, "user");
        assert_eq!(
            ms[3].content,
            r#"{"tool_response":{"tool_call_id":"call_1","content":"21 C"}}"#
        );
    }
}
