//! The HTML form of the report: one self-contained page (inline CSS, no
//! scripts, nothing fetched), verdict and summary table first, then one
//! section per check with the data behind it.

use serde_json::Value;

use super::Report;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "—".to_string(),
        Value::String(s) => esc(s),
        Value::Bool(true) => "yes".to_string(),
        Value::Bool(false) => "no".to_string(),
        Value::Array(a) if a.is_empty() => "none".to_string(),
        Value::Array(a) => esc(&a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", ")),
        other => esc(&other.to_string()),
    }
}

/// Renders arrays of objects as tables and scalars as a definition list.
fn data(v: &Value) -> String {
    let Value::Object(map) = v else {
        return format!("<pre>{}</pre>", esc(&v.to_string()));
    };
    let mut scalars = String::new();
    let mut tables = String::new();
    for (k, val) in map {
        match val {
            Value::Array(rows) if rows.iter().all(Value::is_object) && !rows.is_empty() => {
                let mut cols: Vec<String> = Vec::new();
                for r in rows {
                    if let Value::Object(o) = r {
                        for c in o.keys() {
                            if !cols.contains(c) {
                                cols.push(c.clone());
                            }
                        }
                    }
                }
                tables.push_str(&format!(
                    "<h4>{}</h4><div class=scroll><table class=data><tr>",
                    esc(k)
                ));
                for c in &cols {
                    tables.push_str(&format!("<th>{}</th>", esc(c)));
                }
                tables.push_str("</tr>");
                for r in rows {
                    tables.push_str("<tr>");
                    for c in &cols {
                        tables.push_str(&format!(
                            "<td>{}</td>",
                            cell(r.get(c).unwrap_or(&Value::Null))
                        ));
                    }
                    tables.push_str("</tr>");
                }
                tables.push_str("</table></div>");
            }
            Value::Object(_) => tables.push_str(&format!("<h4>{}</h4>{}", esc(k), data(val))),
            other => scalars.push_str(&format!("<dt>{}</dt><dd>{}</dd>", esc(k), cell(other))),
        }
    }
    if scalars.is_empty() {
        tables
    } else {
        format!("<dl>{scalars}</dl>{tables}")
    }
}

const STYLE: &str = "
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2433;margin:0;background:#f5f6f8}
main{max-width:1080px;margin:0 auto;padding:28px 32px 60px}
h1{font-size:24px;margin:0 0 4px}
.meta{color:#5b6475;margin-bottom:20px}
.verdict{display:flex;align-items:center;gap:18px;padding:18px 22px;border-radius:10px;color:#fff;margin-bottom:22px}
.verdict.pass{background:#1f7a4d}.verdict.fail{background:#b42318}
.verdict b{font-size:28px;letter-spacing:1px}
table{border-collapse:collapse;width:100%}
.summary{background:#fff;border-radius:10px;overflow:hidden;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.summary th,.summary td{padding:9px 14px;text-align:left;border-bottom:1px solid #eceef2;vertical-align:top}
.summary th{background:#eef0f4;font-weight:600;font-size:13px;text-transform:uppercase;color:#4a5263}
.badge{display:inline-block;min-width:44px;text-align:center;padding:2px 8px;border-radius:12px;font-weight:700;font-size:12px}
.badge.pass{background:#d3f3e2;color:#11663c}.badge.fail{background:#fde0dc;color:#a0180e}
.req{white-space:nowrap;color:#4a5263;font-size:13px}
section{background:#fff;border-radius:10px;padding:16px 22px;margin-top:18px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section h3{margin:0 0 6px;font-size:17px}
section.fail{border-left:5px solid #b42318}section.pass{border-left:5px solid #1f7a4d}
h4{margin:14px 0 6px;font-size:13px;text-transform:uppercase;color:#4a5263}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:8px 0}
dt{color:#5b6475}dd{margin:0}
.scroll{overflow-x:auto}
table.data{font-size:12.5px}
table.data th,table.data td{border-bottom:1px solid #eceef2;padding:4px 8px;text-align:left;white-space:nowrap}
table.data th{background:#f5f6f8}
";

/// The report as one HTML page.
pub fn html(r: &Report) -> String {
    let cls = if r.summary.failed == 0 {
        "pass"
    } else {
        "fail"
    };
    let mut out = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>\
         <title>{title}</title><style>{STYLE}</style></head><body><main>\
         <h1>{title}</h1><div class=meta>Generated {gen} · database {backend} · crypto mode {mode}</div>\
         <div class='verdict {cls}'><b>{verdict}</b><span>{passed} of {total} checks pass{failed}</span></div>\
         <table class=summary><tr><th>Result</th><th>Check</th><th>Requirement</th><th>Finding</th></tr>",
        title = esc(&r.title),
        gen = esc(&r.generated_at),
        backend = esc(&r.backend),
        mode = esc(&r.crypto_mode),
        verdict = esc(&r.summary.verdict),
        passed = r.summary.passed,
        total = r.summary.total,
        failed = if r.summary.failed > 0 { format!(" · {} fail", r.summary.failed) } else { String::new() },
    );
    for c in &r.checks {
        let b = if c.passed { "pass" } else { "fail" };
        out.push_str(&format!(
            "<tr><td><span class='badge {b}'>{}</span></td><td><a href='#{id}'>{}</a></td><td class=req>{}</td><td>{}</td></tr>",
            b.to_uppercase(),
            esc(&c.title),
            esc(&c.requirement),
            esc(&c.finding),
            id = esc(&c.id),
        ));
    }
    out.push_str("</table>");
    for c in &r.checks {
        let b = if c.passed { "pass" } else { "fail" };
        out.push_str(&format!(
            "<section id='{id}' class={b}><h3><span class='badge {b}'>{}</span> {}</h3><div class=req>{}</div><p>{}</p>{}</section>",
            b.to_uppercase(),
            esc(&c.title),
            esc(&c.requirement),
            esc(&c.finding),
            data(&c.data),
            id = esc(&c.id),
        ));
    }
    out.push_str("</main></body></html>\n");
    out
}
