//! The JSON schemas of structured output (`response_format: json_schema`,
//! the Responses API's `text.format`), checked the same way at the HTTP
//! edge and at a seeder, and turned into the grammar the engine samples
//! within (llama.cpp's converter).
//!
//! The converter ignores what it does not know (a `format` such as
//! `email`, bounds on a non-integer, a `pattern` it cannot translate), and
//! an ignored keyword would be a silent pass: output that does not
//! validate. So a schema may use only what the converter enforces, and
//! anything else is refused with a message naming it and where it is:
//! `type` (one or several of the seven JSON types), `properties`,
//! `required`, `additionalProperties`, `items` and `prefixItems`,
//! `minItems`/`maxItems`, `minLength`/`maxLength`, the `date`, `time`,
//! `date-time` and `uuid` formats, integer bounds (`minimum`, `maximum`
//! and their exclusive forms), `enum`, `const`, `anyOf`/`oneOf`, `allOf`,
//! and `$ref` into the schema's own `$defs` or `definitions`; annotations
//! (`title`, `description`, `default`, ...) are taken and enforce nothing.
//! A keyword that decides the node alone (`$ref`, `anyOf`, `oneOf`,
//! `allOf`, `const`, `enum`) may stand only with annotations (and `enum` or
//! `const` with a `type` its values all have): the converter would ignore
//! the rest. Sizes are bounded: the schema's bytes, depth and nodes, and
//! the counts that expand into grammar rules.

use serde_json::{Map, Value};

/// A schema longer than this is refused: it is converted on the request
/// path, and its grammar constrains every token.
pub const MAX_SCHEMA_BYTES: usize = 32 * 1024;
/// Nesting deeper than this is refused (the converter recurses).
pub const MAX_SCHEMA_DEPTH: usize = 24;
/// Subschemas in one schema at most.
pub const MAX_SCHEMA_NODES: usize = 1024;
/// `minLength`, `maxLength`, `minItems` and `maxItems` at most: the grammar
/// spells out each repetition.
pub const MAX_SCHEMA_REPEAT: u64 = 256;

/// The schema asking for any JSON object (`response_format: json_object`).
pub const ANY_OBJECT: &str = r#"{"type":"object"}"#;

/// Keywords that enforce nothing.
const ANNOTATIONS: [&str; 11] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "nullable",
];

const TYPES: [&str; 7] = [
    "null", "boolean", "number", "integer", "string", "array", "object",
];

const STRING_FORMATS: [&str; 9] = [
    "date",
    "time",
    "date-time",
    "uuid",
    "uuid1",
    "uuid2",
    "uuid3",
    "uuid4",
    "uuid5",
];

/// The keywords a type allows beside `type`.
fn keywords_of(ty: &str) -> &'static [&'static str] {
    match ty {
        "object" => &["properties", "required", "additionalProperties"],
        "array" => &["items", "prefixItems", "minItems", "maxItems"],
        "string" => &["minLength", "maxLength", "format"],
        "integer" => &["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
        _ => &[],
    }
}

/// Keywords that decide a node alone.
const DECIDING: [&str; 6] = ["$ref", "anyOf", "oneOf", "allOf", "const", "enum"];

struct Walk<'a> {
    root: &'a Value,
    nodes: usize,
}

/// Checks `schema_json` (a JSON schema's text); the parsed schema.
pub fn check_schema(schema_json: &str) -> Result<Value, String> {
    if schema_json.len() > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the JSON schema is {} bytes; at most {MAX_SCHEMA_BYTES} are allowed",
            schema_json.len()
        ));
    }
    let root: Value = serde_json::from_str(schema_json)
        .map_err(|e| format!("the JSON schema does not parse: {e}"))?;
    let mut w = Walk {
        root: &root,
        nodes: 0,
    };
    w.node(&root, "#", 0)?;
    Ok(root)
}

/// The exponent of a number as the converter writes it: up to 16 digits,
/// which JSON allows and no double holds (`1e1111` parses as infinity or
/// not at all).
const WIDE_EXPONENT: &str = "([eE] [-+]? integral-part)?";
/// The exponents a double holds: two digits.
const DOUBLE_EXPONENT: &str = "([eE] [-+]? [0-9]{1,2})?";

/// The grammar for `schema_json`, checked: the converter's, with numbers
/// held to what a double represents.
pub fn grammar_for(schema_json: &str) -> Result<String, String> {
    check_schema(schema_json)?;
    let grammar = hypha_engine::json_schema_to_grammar(schema_json).map_err(|e| e.to_string())?;
    Ok(grammar.replace(WIDE_EXPONENT, DOUBLE_EXPONENT))
}

fn is_of_type(v: &Value, ty: &str) -> bool {
    match ty {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

impl Walk<'_> {
    fn node(&mut self, schema: &Value, at: &str, depth: usize) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_SCHEMA_NODES {
            return Err(format!(
                "the JSON schema has more than {MAX_SCHEMA_NODES} subschemas"
            ));
        }
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {at}"
            ));
        }
        let Some(obj) = schema.as_object() else {
            return Err(format!("the JSON schema at {at} must be an object"));
        };
        // `$defs` and `definitions` are checked where a `$ref` leads, and
        // at the root, so that a schema's unused definitions are too.
        for defs in ["$defs", "definitions"] {
            if let Some(d) = obj.get(defs) {
                if at != "#" {
                    return Err(format!(
                        "`{defs}` is supported only at the schema's root, not at {at}"
                    ));
                }
                let Some(d) = d.as_object() else {
                    return Err(format!("`{defs}` must be an object"));
                };
                for (name, sub) in d {
                    self.node(sub, &format!("#/{defs}/{name}"), depth + 1)?;
                }
            }
        }
        let active: Vec<(&String, &Value)> = obj
            .iter()
            .filter(|(k, _)| {
                !ANNOTATIONS.contains(&k.as_str()) && *k != "$defs" && *k != "definitions"
            })
            .collect();
        if let Some((key, v)) = active.iter().find(|(k, _)| DECIDING.contains(&k.as_str())) {
            return self.deciding(key, v, obj, &active, at, depth);
        }
        let types: Vec<&str> = match obj.get("type") {
            None => Vec::new(),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| format!("`type` at {at} must name types"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(format!(
                    "`type` at {at} must be a type or a non-empty list of them"
                ))
            }
        };
        if let Some(t) = types.iter().find(|t| !TYPES.contains(t)) {
            return Err(format!("unknown type {t:?} at {at}"));
        }
        let allowed: Vec<&str> = if types.is_empty() {
            // Without a type the converter reads object, array and string
            // keywords; integer bounds it ignores, and a mix is ambiguous.
            let groups: Vec<&str> = ["object", "array", "string"]
                .into_iter()
                .filter(|t| {
                    active
                        .iter()
                        .any(|(k, _)| keywords_of(t).contains(&k.as_str()))
                })
                .collect();
            if groups.len() > 1 {
                return Err(format!(
                    "the schema at {at} mixes keywords of {} without a `type`",
                    groups.join(" and ")
                ));
            }
            groups
                .iter()
                .flat_map(|t| keywords_of(t))
                .copied()
                .collect()
        } else {
            types.iter().flat_map(|t| keywords_of(t)).copied().collect()
        };
        for (k, v) in &active {
            let k = k.as_str();
            if k == "type" {
                continue;
            }
            if !allowed.contains(&k) {
                let why = match k {
                    "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                        "bounds are enforced only on `type: integer`"
                    }
                    "pattern" => "patterns are not enforced by this node",
                    _ if keywords_of("object").contains(&k)
                        || keywords_of("array").contains(&k)
                        || keywords_of("string").contains(&k) =>
                    {
                        "it does not apply to the schema's type"
                    }
                    _ => "this node does not enforce it",
                };
                return Err(format!(
                    "unsupported JSON schema keyword `{k}` at {at}: {why}"
                ));
            }
            self.keyword(k, v, at, depth)?;
        }
        Ok(())
    }

    /// A node decided by `key` alone.
    fn deciding(
        &mut self,
        key: &str,
        v: &Value,
        obj: &Map<String, Value>,
        active: &[(&String, &Value)],
        at: &str,
        depth: usize,
    ) -> Result<(), String> {
        let values_with_type = key == "enum" || key == "const";
        if let Some((other, _)) = active
            .iter()
            .find(|(k, _)| k.as_str() != key && !(values_with_type && k.as_str() == "type"))
        {
            return Err(format!(
                "`{key}` at {at} may stand only with annotations{}, not with `{other}`",
                if values_with_type { " and `type`" } else { "" }
            ));
        }
        match key {
            "$ref" => {
                let r = v
                    .as_str()
                    .ok_or_else(|| format!("`$ref` at {at} must be a string"))?;
                let target = r
                    .strip_prefix("#/$defs/")
                    .map(|n| ("$defs", n))
                    .or_else(|| r.strip_prefix("#/definitions/").map(|n| ("definitions", n)));
                let found = target.and_then(|(defs, name)| self.root.get(defs)?.get(name));
                if found.is_none() {
                    return Err(format!(
                        "`$ref` {r:?} at {at}: only references to the schema's own `$defs` or `definitions` are supported"
                    ));
                }
                Ok(())
            }
            "anyOf" | "oneOf" | "allOf" => {
                let alts = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                    format!("`{key}` at {at} must be a non-empty list of schemas")
                })?;
                for (i, alt) in alts.iter().enumerate() {
                    self.node(alt, &format!("{at}/{key}/{i}"), depth + 1)?;
                }
                Ok(())
            }
            _ => {
                let values: Vec<&Value> = if key == "const" {
                    vec![v]
                } else {
                    v.as_array()
                        .filter(|a| !a.is_empty())
                        .ok_or_else(|| format!("`enum` at {at} must be a non-empty list"))?
                        .iter()
                        .collect()
                };
                let types: Vec<&str> = match obj.get("type") {
                    None => return Ok(()),
                    Some(Value::String(t)) => vec![t.as_str()],
                    Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
                    Some(_) => return Err(format!("`type` at {at} must name types")),
                };
                if let Some(bad) = values
                    .iter()
                    .find(|x| !types.iter().any(|t| is_of_type(x, t)))
                {
                    return Err(format!(
                        "`{key}` at {at} holds {bad}, which is not of the schema's `type`"
                    ));
                }
                Ok(())
            }
        }
    }

    fn count(k: &str, v: &Value, at: &str) -> Result<(), String> {
        match v.as_u64() {
            Some(n) if n <= MAX_SCHEMA_REPEAT => Ok(()),
            Some(_) => Err(format!("`{k}` at {at} may be at most {MAX_SCHEMA_REPEAT}")),
            None => Err(format!("`{k}` at {at} must be a whole number")),
        }
    }

    fn keyword(&mut self, k: &str, v: &Value, at: &str, depth: usize) -> Result<(), String> {
        match k {
            "properties" => {
                let props = v
                    .as_object()
                    .ok_or_else(|| format!("`properties` at {at} must be an object"))?;
                for (name, sub) in props {
                    self.node(sub, &format!("{at}/properties/{name}"), depth + 1)?;
                }
            }
            "required" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
                return Err(format!("`required` at {at} must be a list of names"));
            }
            "additionalProperties" if !v.is_boolean() => {
                self.node(v, &format!("{at}/additionalProperties"), depth + 1)?;
            }
            "items" | "prefixItems" => match v {
                Value::Array(items) => {
                    for (i, sub) in items.iter().enumerate() {
                        self.node(sub, &format!("{at}/{k}/{i}"), depth + 1)?;
                    }
                }
                _ => self.node(v, &format!("{at}/{k}"), depth + 1)?,
            },
            "minItems" | "maxItems" | "minLength" | "maxLength" => Self::count(k, v, at)?,
            "format" => {
                let f = v.as_str().unwrap_or_default();
                if !STRING_FORMATS.contains(&f) {
                    return Err(format!(
                        "unsupported string format {v} at {at}: this node enforces {}",
                        STRING_FORMATS[..4].join(", ")
                    ));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !v.is_number() => {
                return Err(format!("`{k}` at {at} must be a number"));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(schema: &str, naming: &str) {
        match check_schema(schema) {
            Ok(_) => panic!("{schema} was taken"),
            Err(e) => assert!(e.contains(naming), "{schema}: {e}"),
        }
    }

    #[test]
    fn what_the_converter_enforces_is_taken() {
        for s in [
            ANY_OBJECT,
            r##"{"type":"object","properties":{"a":{"type":"integer","minimum":1,"maximum":9},
                "b":{"type":"array","items":{"type":"string","maxLength":4},"minItems":1,"maxItems":3},
                "c":{"enum":["x","y"],"type":"string","title":"C"},
                "d":{"anyOf":[{"type":"null"},{"type":"boolean"}]},
                "e":{"$ref":"#/$defs/E"},"f":{"type":"string","format":"date"}},
                "required":["a"],"additionalProperties":false,
                "$defs":{"E":{"type":"object","properties":{"n":{"type":"number"}}}}}"##,
            r#"{"type":["string","null"],"maxLength":3}"#,
            r#"{"const":3}"#,
            r#"{"items":[{"type":"null"}]}"#,
        ] {
            check_schema(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn what_it_would_ignore_is_refused_by_name() {
        refused(r#"{"type":"string","pattern":"^a+$"}"#, "`pattern`");
        refused(r#"{"type":"string","format":"email"}"#, "format");
        refused(r#"{"type":"number","minimum":0}"#, "`minimum`");
        refused(
            r#"{"type":"object","properties":{"a":{"not":{}}}}"#,
            "`not` at #/properties/a",
        );
        refused(
            r#"{"type":"object","patternProperties":{}}"#,
            "`patternProperties`",
        );
        refused(r#"{"anyOf":[{"type":"null"}],"type":"object"}"#, "`anyOf`");
        refused(r#"{"enum":[1,"a"],"type":"string"}"#, "`enum`");
        refused(r#"{"$ref":"https://example.com/s.json"}"#, "`$ref`");
        refused(r##"{"$ref":"#/$defs/missing"}"##, "`$ref`");
        refused(r#"{"type":"frob"}"#, "unknown type");
        refused(r#"{"properties":{},"items":{}}"#, "mixes");
        refused(r#"{"type":"string","maxLength":100000}"#, "at most");
        refused(r#"[1]"#, "must be an object");
        refused("{", "does not parse");
    }

    #[test]
    fn numbers_keep_to_what_a_double_holds() {
        let g = grammar_for(r#"{"type":"number"}"#).unwrap();
        assert!(g.contains(DOUBLE_EXPONENT), "{g}");
        assert!(!g.contains(WIDE_EXPONENT), "{g}");
    }

    #[test]
    fn sizes_are_bounded() {
        let deep = format!("{}{{}}{}", r#"{"items":"#.repeat(40), "}".repeat(40));
        refused(&deep, "deeper");
        let wide = format!(
            r#"{{"anyOf":[{}]}}"#,
            vec![r#"{"type":"null"}"#; MAX_SCHEMA_NODES + 1].join(",")
        );
        refused(&wide, "subschemas");
        let long = format!(r#"{{"description":"{}"}}"#, "x".repeat(MAX_SCHEMA_BYTES));
        refused(&long, "bytes");
    }
}
