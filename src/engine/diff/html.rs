//! The HTML page of `repro diff --html`: the same content as [`Comparison::text`], as one
//! self-contained file (inline CSS, no scripts, nothing fetched), so it can sit next to the
//! report or be mailed. Every value from a run, a manifest or a results document is
//! HTML-escaped.

use std::fmt::Write as _;

use super::{
    percent, plain, short, short_or_absent, signed, verdict_line, Comparison, ResultsComparison,
};

const STYLE: &str = "
body { font: 15px/1.45 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
code, td.num, .key { font-family: ui-monospace, monospace; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; }
ul { margin: 0.25rem 0; padding-left: 1.25rem; }
.none { color: #777; }
";

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// The whole page.
pub fn page(c: &Comparison) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>repro diff: {} vs {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&c.a.label),
        escape(&c.b.label)
    );
    let _ = writeln!(w, "<h1>Runs compared</h1>\n<table>");
    for (side, s) in [("A", &c.a), ("B", &c.b)] {
        let _ = writeln!(
            w,
            "<tr><th>{side}</th><td><code>{}</code><br>{}</td></tr>",
            escape(&s.label),
            escape(&s.detail)
        );
    }
    let _ = writeln!(
        w,
        "</table>\n<p><strong>{}</strong></p>",
        escape(&c.headline())
    );

    let _ = writeln!(w, "<h2 id=\"stages\">Stages</h2>\n<table>");
    let names = |list: &[String]| {
        if list.is_empty() {
            "<span class=\"none\">none</span>".to_string()
        } else {
            list.iter()
                .map(|n| format!("<code>{}</code>", escape(n)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(
        w,
        "<tr><th>only in A</th><td>{}</td></tr>",
        names(&c.only_a)
    );
    let _ = writeln!(
        w,
        "<tr><th>only in B</th><td>{}</td></tr>",
        names(&c.only_b)
    );
    let _ = writeln!(
        w,
        "<tr><th>key changed</th><td>{}</td></tr>",
        c.changed.len()
    );
    let _ = writeln!(
        w,
        "<tr><th>same key</th><td>{}</td></tr>",
        c.unchanged.len()
    );
    let _ = writeln!(
        w,
        "<tr><th>not comparable</th><td>{}</td></tr>\n</table>",
        c.uncompared.len()
    );

    if !c.changed.is_empty() {
        let _ = writeln!(
            w,
            "<h2 id=\"changed\">Stages whose key changed</h2>\n<table>\n\
             <tr><th>stage</th><th>key A → B</th><th>what changed</th><th>outputs</th></tr>"
        );
        for s in &c.changed {
            let fields = match &s.fields {
                Ok(lines) => list(lines),
                Err(why) => format!("key fields unknown: {}", escape(why)),
            };
            let outputs = match &s.outputs {
                Ok(o) => {
                    let mut items: Vec<String> = o
                        .changed
                        .iter()
                        .map(|(name, ha, hb)| {
                            format!(
                                "<code>{}</code> changed: <span class=\"key\">{} → {}</span>",
                                escape(name),
                                escape(short_or_absent(ha)),
                                escape(short_or_absent(hb))
                            )
                        })
                        .collect();
                    if o.changed.is_empty() {
                        items.push(format!(
                            "all {} have the same bytes (early cutoff)",
                            o.same.len()
                        ));
                    } else if !o.same.is_empty() {
                        // <details> folds a long list without a script.
                        items.push(format!(
                            "<details><summary>{} with the same bytes</summary>{}</details>",
                            o.same.len(),
                            escape(&o.same.join(", "))
                        ));
                    }
                    format!(
                        "<ul>{}</ul>",
                        items
                            .iter()
                            .map(|i| format!("<li>{i}</li>"))
                            .collect::<String>()
                    )
                }
                Err(why) => format!("not compared: {}", escape(why)),
            };
            let _ = writeln!(
                w,
                "<tr><td><code>{}</code><br><span class=\"none\">{}</span></td>\
                 <td class=\"key\">{}<br>{}</td><td>{fields}</td><td>{outputs}</td></tr>",
                escape(&s.name),
                escape(&s.kind),
                escape(short(&s.key_a)),
                escape(short(&s.key_b)),
            );
        }
        let _ = writeln!(w, "</table>");
    }
    if !c.uncompared.is_empty() {
        let _ = writeln!(w, "<h2 id=\"uncompared\">Not comparable</h2>\n<ul>");
        for (name, why) in &c.uncompared {
            let _ = writeln!(w, "<li><code>{}</code>: {}</li>", escape(name), escape(why));
        }
        let _ = writeln!(w, "</ul>");
    }
    results(w, &c.results);
    let _ = writeln!(w, "</body>\n</html>");
    out
}

/// `<ul>` of escaped lines.
fn list(lines: &[String]) -> String {
    let items: String = lines
        .iter()
        .map(|l| format!("<li>{}</li>", escape(l)))
        .collect();
    format!("<ul>{items}</ul>")
}

fn results(w: &mut String, r: &ResultsComparison) {
    let _ = writeln!(
        w,
        "<h2 id=\"results\"><code>{}</code> of stage <code>{}</code></h2>\n<table>",
        escape(&r.output),
        escape(&r.stage)
    );
    for (side, what) in [("A", &r.a), ("B", &r.b)] {
        let text = match what {
            Ok(what) => escape(what),
            Err(why) => format!("none: {}", escape(why)),
        };
        let _ = writeln!(w, "<tr><th>{side}</th><td>{text}</td></tr>");
    }
    let _ = writeln!(w, "</table>");
    let Some(d) = &r.diff else {
        let _ = writeln!(
            w,
            "<p>Numbers not compared: a side has no {}.</p>",
            escape(&r.output)
        );
        return;
    };
    let _ = writeln!(
        w,
        "<h3>Metrics that moved: {} of {} on both sides</h3>",
        d.moved.len(),
        d.compared
    );
    if !d.moved.is_empty() {
        let _ = writeln!(
            w,
            "<table>\n<tr><th>metric</th><th>A</th><th>B</th><th>change</th><th>relative</th></tr>"
        );
        for m in &d.moved {
            // No colours: whether up is better depends on the metric (error vs accuracy).
            let abs = m.absolute();
            let relative = match (abs, m.relative()) {
                (_, Some(rel)) => percent(rel),
                (Some(_), None) => "from 0".to_string(),
                _ => String::new(),
            };
            let _ = writeln!(
                w,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&m.name),
                escape(&plain(&m.old)),
                escape(&plain(&m.new)),
                abs.map(signed).unwrap_or_default(),
                escape(&relative)
            );
        }
        let _ = writeln!(w, "</table>");
    }
    for (what, entries) in [("added", &d.added), ("removed", &d.removed)] {
        if !entries.is_empty() {
            let _ = writeln!(w, "<h3>Metrics {what}: {}</h3>", entries.len());
            let lines: Vec<String> = entries
                .iter()
                .map(|(name, value)| format!("{name} = {}", plain(value)))
                .collect();
            let _ = writeln!(w, "{}", list(&lines));
        }
    }
    let _ = writeln!(
        w,
        "<h3>Claims with a different verdict: {}</h3>",
        d.verdicts.len()
    );
    if !d.verdicts.is_empty() {
        let lines: Vec<String> = d.verdicts.iter().map(verdict_line).collect();
        let _ = writeln!(w, "{}", list(&lines));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<b a="1">'x' & y</b>"#),
            "&lt;b a=&quot;1&quot;&gt;&#39;x&#39; &amp; y&lt;/b&gt;"
        );
    }
}
