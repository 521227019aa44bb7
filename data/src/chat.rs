//! The chat template, rendered from `tokenizer_config.json`'s own Jinja text with `minijinja`,
//! in the environment HF's `apply_chat_template` uses (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, and the special tokens as variables). Nothing about the format is
//! hard-coded here: a different template file renders differently.

use crate::{DataError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A Jinja chat template and the special-token strings it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    specials: Vec<(String, String)>,
}

/// A special token of tokenizer_config.json: a plain string or `{"content": …}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// A template from its Jinja source; `specials` are variables such as `eos_token`.
    pub fn new(source: impl Into<String>, specials: Vec<(String, String)>) -> Result<ChatTemplate> {
        let t = ChatTemplate { source: source.into(), specials };
        // Compile once now, so a broken template is reported when it is loaded.
        t.environment()?;
        Ok(t)
    }

    /// The template of a `tokenizer_config.json` (`None` when it has no `chat_template`).
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| DataError::format(path, format!("not valid JSON: {e}")))?;
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // HF also allows a list of named templates; the one named "default" is used.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    DataError::format(path, "chat_template is a list without a \"default\" entry")
                })?,
            Some(_) => return Err(DataError::format(path, "chat_template must be a string")),
        };
        let specials = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(token_string).map(|s| (k.to_string(), s)))
            .collect();
        ChatTemplate::new(source, specials).map(Some).map_err(|e| match e {
            DataError::Template(m) => DataError::format(path, format!("chat_template: {m}")),
            other => other,
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.source).map_err(|e| DataError::Template(e.to_string()))?;
        Ok(env)
    }

    /// Renders `messages`; with `add_generation_prompt` the assistant's header is appended.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let tmpl = env.get_template("chat").map_err(|e| DataError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| DataError::Template(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        tmpl.render(Value::Object(ctx)).map_err(|e| DataError::Template(e.to_string()))
    }
}
