//! Placing an error in the config file: the line and column of a key.

use std::ops::Range;

use super::Config;

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The span of the value (or table header) at a dotted path such as
/// `plugins[1].limits.cpu_ms`, found by walking the document.
pub(super) fn span_of(text: &str, key: &str) -> Option<Range<usize>> {
    let doc: toml::Spanned<toml::de::DeTable<'_>> = toml::de::DeTable::parse(text).ok()?;
    let mut span = doc.span();
    let mut current: Option<&toml::de::DeValue<'_>> = None;
    let mut table = Some(doc.get_ref());
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let t = match current {
            None => table?,
            Some(toml::de::DeValue::Table(t)) => t,
            Some(_) => return Some(span),
        };
        let value = t.get(name)?;
        span = value.span();
        current = Some(value.get_ref());
        table = None;
        if let (Some(i), toml::de::DeValue::Array(items)) = (index, value.get_ref()) {
            let item = items.get(i)?;
            span = item.span();
            current = Some(item.get_ref());
        }
    }
    Some(span)
}

impl Config {
    /// Places an error about plugin `name` in the file: `FILE:LINE:COL:
    /// plugins[N].KEY: what`. A message naming a key of the plugin's
    /// config as the SDK does (`config.KEY: what`) points at that key;
    /// any other at the plugin's entry.
    pub fn locate_plugin_error(&self, name: &str, message: &str) -> String {
        let (Some(source), Some(index)) = (
            &self.source,
            self.plugins.iter().position(|p| p.name == name),
        ) else {
            return message.to_string();
        };
        let entry = format!("plugins[{index}]");
        let found = message
            .match_indices("config")
            .filter(|(at, _)| *at == 0 || message[..*at].ends_with(": "))
            .find_map(|(at, _)| {
                let rest = &message[at..];
                let (path, what) = rest.split_once(": ")?;
                let valid = path == "config"
                    || path
                        .strip_prefix("config.")
                        .is_some_and(|k| !k.is_empty() && !k.contains(char::is_whitespace));
                valid.then(|| (path.to_string(), what.to_string()))
            });
        let (key, what) = match found {
            Some((path, what)) => (format!("{entry}.{path}"), what),
            None => (entry.clone(), message.to_string()),
        };
        // The deepest part of the key the file holds: a missing key is
        // placed at the table that lacks it.
        let mut probe = key.as_str();
        let span = loop {
            if let Some(span) = span_of(&source.text, probe) {
                break Some(span);
            }
            match probe.rfind('.') {
                Some(dot) => probe = &probe[..dot],
                None => break None,
            }
        };
        let (line, column) = span.map_or((1, 1), |s| line_col(&source.text, s.start));
        format!("{}:{line}:{column}: {key}: {what}", source.file)
    }
}
