//! Tables for people, JSON for scripts.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

/// A cell's text: strings bare, other values as JSON, absent as empty.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints `value` as JSON, or as a two-column table of its fields.
pub fn print_object(value: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        return;
    }
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY);
    t.set_header(["field", "value"]);
    if let Some(obj) = value.as_object() {
        for (k, v) in obj {
            t.add_row([k.clone(), cell(v)]);
        }
    }
    println!("{t}");
}

/// Prints `rows` as JSON, or as a table of the given columns (JSON pointers).
pub fn print_list(rows: &[Value], columns: &[(&str, &str)], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY);
    t.set_header(columns.iter().map(|(h, _)| *h));
    for r in rows {
        t.add_row(columns.iter().map(|(_, ptr)| cell(r.pointer(ptr).unwrap_or(&Value::Null))));
    }
    println!("{t}");
    println!("{} item(s)", rows.len());
}
