//! The config: aggregates with their commands and rules, projections, and
//! the small language both fold events with.
//!
//! An update says what an event does to a JSON object (an aggregate's
//! state, or a projection's document):
//! - `set = { field = VALUE }` sets fields;
//! - `add = { field = VALUE }` adds a number to a field (absent is 0),
//!   `sub` takes it away;
//! - `delete = true` removes the document (projections).
//!
//! A VALUE is a literal, or a string naming part of the event:
//! `"$.a.b"` (a path into its data), `"$stream"`, `"$id"` (the stream's
//! name after the aggregate's `-`), `"$type"`, `"$version"`,
//! `"$position"`, `"$created_ms"`. A path the event lacks, or `add` of
//! something not a number, is an error: a command is refused, a
//! projection parks the event.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The plugin's config.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The event-store plugin (the `plugins` capability and
    /// `allowed_plugins` must grant it).
    #[serde(default = "default_store")]
    pub store: String,
    #[serde(default)]
    pub aggregates: BTreeMap<String, Aggregate>,
    #[serde(default)]
    pub projections: BTreeMap<String, Projection>,
}

fn default_store() -> String {
    "events".into()
}

/// An aggregate: streams `{name}-{id}`, folded by `on` into the state its
/// commands are checked against.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    #[serde(default)]
    pub on: BTreeMap<String, Update>,
    #[serde(default)]
    pub commands: BTreeMap<String, CommandDef>,
}

/// Whether a command wants its aggregate to exist.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Creates it: refused if it exists.
    New,
    /// Refused unless it exists.
    #[default]
    Exists,
    Any,
}

/// A command: checked, then appended as one event whose data is the
/// command's body.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct CommandDef {
    /// The type of the event it appends.
    pub event: String,
    #[serde(default)]
    pub expect: Expect,
    /// Fields the body must have.
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A check of a command: `field` of the body (a number) against `min`,
/// `max`, or `at_most_state` (a number field of the state); or `state`
/// field equal to `equals`. `message` is the refusal's.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub field: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub at_most_state: Option<String>,
    pub state: Option<String>,
    pub equals: Option<Value>,
    pub message: Option<String>,
}

/// What an event does to an object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Update {
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    #[serde(default)]
    pub add: BTreeMap<String, Value>,
    #[serde(default)]
    pub sub: BTreeMap<String, Value>,
    #[serde(default)]
    pub delete: bool,
}

/// A projection (read model): documents kept from events of `$all`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Projection {
    /// Raising it rebuilds the projection beside the one serving.
    #[serde(default = "one")]
    pub version: u64,
    /// Only streams starting with this.
    #[serde(default)]
    pub streams: Option<String>,
    /// The document an event updates: a VALUE (default `"$id"`).
    #[serde(default = "default_key")]
    pub key: String,
    pub on: BTreeMap<String, Update>,
}

fn one() -> u64 {
    1
}

fn default_key() -> String {
    "$id".into()
}

impl Config {
    /// Refuses what cannot work, naming it.
    pub fn check(&self) -> Result<(), String> {
        for (name, a) in &self.aggregates {
            if !plexus_sdk::http::is_ident(name) || name.contains('-') {
                return Err(format!(
                    "config.aggregates.{name}: a name of A-Z a-z 0-9 . _ (no `-`: it ends the stream prefix)"
                ));
            }
            for (c, def) in &a.commands {
                for r in &def.rules {
                    if r.field.is_none() == r.state.is_none() {
                        return Err(format!(
                            "config.aggregates.{name}.commands.{c}.rules: a rule names `field` or `state`"
                        ));
                    }
                }
            }
        }
        for (name, p) in &self.projections {
            if !plexus_sdk::http::is_ident(name) {
                return Err(format!(
                    "config.projections.{name}: a name of A-Z a-z 0-9 . _ -"
                ));
            }
            if p.on.is_empty() {
                return Err(format!("config.projections.{name}.on: no event types"));
            }
        }
        Ok(())
    }

    /// The aggregate whose streams `stream` is one of.
    pub fn aggregate_of(&self, stream: &str) -> Option<&Aggregate> {
        let (name, _) = stream.split_once('-')?;
        self.aggregates.get(name)
    }
}

/// An event as the event store shows it.
pub struct Event<'a>(pub &'a Value);

impl Event<'_> {
    /// What a VALUE names in this event.
    pub fn value(&self, v: &Value) -> Result<Value, String> {
        let Value::String(s) = v else {
            return Ok(v.clone());
        };
        let e = self.0;
        let got = match s.as_str() {
            "$stream" => e["stream"].clone(),
            "$id" => e["stream"]
                .as_str()
                .and_then(|s| s.split_once('-'))
                .map_or(e["stream"].clone(), |(_, id)| id.into()),
            "$type" => e["type"].clone(),
            "$version" => e["version"].clone(),
            "$position" => e["position"].clone(),
            "$created_ms" => e["created_ms"].clone(),
            path if path.starts_with("$.") => {
                let mut at = &e["data"];
                for part in path[2..].split('.') {
                    at = &at[part];
                }
                at.clone()
            }
            _ => return Ok(v.clone()),
        };
        if got.is_null() {
            return Err(format!("event {} has no {s}", e["position"]));
        }
        Ok(got)
    }
}

impl Update {
    /// `doc` after the event: `None` when deleted.
    pub fn apply(&self, doc: Option<Value>, e: &Event) -> Result<Option<Value>, String> {
        if self.delete {
            return Ok(None);
        }
        let mut doc = match doc {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for (field, v) in &self.set {
            doc.insert(field.clone(), e.value(v)?);
        }
        for (field, v, sign) in self
            .add
            .iter()
            .map(|(f, v)| (f, v, 1.0))
            .chain(self.sub.iter().map(|(f, v)| (f, v, -1.0)))
        {
            let by = e.value(v)?;
            let by = by
                .as_f64()
                .ok_or_else(|| format!("add {field}: {by} is not a number"))?;
            let was = match doc.get(field) {
                None | Some(Value::Null) => 0.0,
                Some(n) => n
                    .as_f64()
                    .ok_or_else(|| format!("add {field}: the document holds {n}"))?,
            };
            doc.insert(field.clone(), number(was + sign * by));
        }
        Ok(Some(Value::Object(doc)))
    }
}

/// A whole number stays one in JSON.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

/// Folds events into an aggregate's state by its `on` updates; events of
/// other types leave it as is.
pub fn fold(
    a: &Aggregate,
    mut state: Option<Value>,
    events: &[Value],
) -> Result<Option<Value>, String> {
    for e in events {
        if let Some(u) = e["type"].as_str().and_then(|t| a.on.get(t)) {
            state = u.apply(state, &Event(e))?;
        }
    }
    Ok(state)
}

/// Checks a command's body against its definition and the state.
pub fn check(def: &CommandDef, body: &Value, state: &Option<Value>) -> Result<(), String> {
    if !body.is_object() {
        return Err("a command's body is a JSON object".into());
    }
    for f in &def.required {
        if body[f].is_null() {
            return Err(format!("`{f}` is required"));
        }
    }
    let state_v = state.clone().unwrap_or(Value::Null);
    for r in &def.rules {
        let ok = match (&r.field, &r.state) {
            (Some(f), _) => {
                let Some(n) = body[f].as_f64() else {
                    return Err(format!("`{f}` must be a number"));
                };
                r.min.is_none_or(|m| n >= m)
                    && r.max.is_none_or(|m| n <= m)
                    && r.at_most_state
                        .as_ref()
                        .is_none_or(|s| state_v[s].as_f64().is_some_and(|have| n <= have))
            }
            (None, Some(s)) => r.equals.as_ref().is_none_or(|want| state_v[s] == *want),
            (None, None) => true,
        };
        if !ok {
            return Err(r.message.clone().unwrap_or_else(|| describe(r)));
        }
    }
    Ok(())
}

fn describe(r: &Rule) -> String {
    match (&r.field, &r.state) {
        (Some(f), _) => {
            let mut parts = Vec::new();
            if let Some(m) = r.min {
                parts.push(format!(">= {m}"));
            }
            if let Some(m) = r.max {
                parts.push(format!("<= {m}"));
            }
            if let Some(s) = &r.at_most_state {
                parts.push(format!("<= the state's `{s}`"));
            }
            format!("`{f}` must be {}", parts.join(" and "))
        }
        (None, Some(s)) => format!(
            "the state's `{s}` must be {}",
            r.equals.clone().unwrap_or_default()
        ),
        (None, None) => "a rule failed".into(),
    }
}
