//! kubectl's JSONPath templates (`-o jsonpath='{.items[*].id}'`), the subset kubectl users write:
//! fields (`.id`, `['id']`), indexes (`[0]`, `[-1]`), `[*]` and `.*`, slices (`[1:3]`),
//! recursive descent (`..id`), `{range …}…{end}`, string literals (`{"\t"}`) and text between
//! expressions. Filters (`[?(…)]`) and unions (`[a,b]`) are refused with an error naming them.
//!
//! As in kubectl: several results of one expression are joined by a space, strings print bare and
//! anything else as JSON, a missing field prints nothing, and no newline is added at the end.
//! A list that `-o json` prints as an array is seen as kubectl sees a list: its elements are
//! `.items` (`{.items[*].id}`), and `{[*].id}` works too.

use serde_json::Value;

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` with no closing `}`.
    #[error("unclosed {{ at byte {0}")]
    Unclosed(usize),
    /// `{end}` without `{range}`, or `{range}` without `{end}`.
    #[error("{0}")]
    Unbalanced(&'static str),
    /// Syntax kubectl has that this plugin does not implement.
    #[error(
        "{0} is not supported (supported: fields, [index], [*], [start:end], .., range/end, \"literals\")"
    )]
    Unsupported(String),
    /// Anything else that cannot be parsed.
    #[error("cannot parse {0:?}")]
    Syntax(String),
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `$`: back to the document's root.
    Root,
    /// `.name` or `['name']`.
    Field(String),
    /// `[n]`, counted from the end when negative.
    Index(i64),
    /// `[*]` or `.*`: every element or member.
    All,
    /// `[start:end]`.
    Slice(Option<i64>, Option<i64>),
    /// `..name`: every `name` at any depth.
    Descend(String),
}

/// A piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// Printed as is.
    Text(String),
    /// `{path}`: its results, joined by spaces.
    Path(Vec<Step>),
    /// `{range path}…{end}`: the body once per result, relative to it.
    Range(Vec<Step>, Vec<Node>),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    nodes: Vec<Node>,
}

impl Template {
    /// Parses a template such as `{range .items[*]}{.id}{"\n"}{end}`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        // Open ranges: the path and the nodes collected so far; the bottom one is the template.
        let mut stack: Vec<(Option<Vec<Step>>, Vec<Node>)> = vec![(None, Vec::new())];
        let mut rest = text;
        let mut offset = 0;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                push_text(&mut stack, rest);
                break;
            };
            push_text(&mut stack, &rest[..open]);
            let inner_start = open + 1;
            let close =
                find_close(&rest[inner_start..]).ok_or(TemplateError::Unclosed(offset + open))?;
            let inner = rest[inner_start..inner_start + close].trim();
            if let Some(path) = inner.strip_prefix("range ") {
                stack.push((Some(parse_path(path.trim())?), Vec::new()));
            } else if inner == "end" {
                if stack.len() < 2 {
                    return Err(TemplateError::Unbalanced("{end} without {range}"));
                }
                let (path, body) = stack.pop().expect("checked above");
                let node = Node::Range(path.expect("ranges carry a path"), body);
                stack.last_mut().expect("bottom stays").1.push(node);
            } else if let Some(literal) = parse_literal(inner)? {
                push_text(&mut stack, &literal);
            } else {
                let node = Node::Path(parse_path(inner)?);
                stack.last_mut().expect("bottom stays").1.push(node);
            }
            let consumed = inner_start + close + 1;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if stack.len() > 1 {
            return Err(TemplateError::Unbalanced("{range} without {end}"));
        }
        Ok(Template {
            nodes: stack.pop().expect("bottom").1,
        })
    }

    /// The template applied to `doc`.
    pub fn render(&self, doc: &Value) -> String {
        let mut out = String::new();
        render_nodes(&self.nodes, doc, doc, &mut out);
        out
    }
}

fn push_text(stack: &mut [(Option<Vec<Step>>, Vec<Node>)], text: &str) {
    if !text.is_empty() {
        stack
            .last_mut()
            .expect("bottom stays")
            .1
            .push(Node::Text(text.to_string()));
    }
}

/// The index of the `}` closing an expression, skipping quoted strings.
fn find_close(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '}' => return Some(i),
            None => {}
        }
    }
    None
}

/// `"\t"` → a tab; `None` when `inner` is not a string literal.
fn parse_literal(inner: &str) -> Result<Option<String>, TemplateError> {
    let Some(body) = inner
        .strip_prefix('"')
        .and_then(|b| b.strip_suffix('"'))
        .or_else(|| inner.strip_prefix('\'').and_then(|b| b.strip_suffix('\'')))
    else {
        return Ok(None);
    };
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(c @ ('\\' | '"' | '\'')) => out.push(c),
            other => {
                return Err(TemplateError::Syntax(format!(
                    "\\{} in {inner}",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        }
    }
    Ok(Some(out))
}

fn parse_path(path: &str) -> Result<Vec<Step>, TemplateError> {
    let mut steps = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('$') {
        steps.push(Step::Root);
        rest = r;
    } else if let Some(r) = rest.strip_prefix('@') {
        rest = r;
    }
    let name_len = |s: &str| {
        s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(s.len())
    };
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("..") {
            let n = name_len(r);
            if n == 0 {
                return Err(TemplateError::Syntax(format!("..{r} in {path}")));
            }
            steps.push(Step::Descend(r[..n].to_string()));
            rest = &r[n..];
        } else if let Some(r) = rest.strip_prefix('.') {
            if let Some(r) = r.strip_prefix('*') {
                steps.push(Step::All);
                rest = r;
                continue;
            }
            let n = name_len(r);
            if n > 0 {
                steps.push(Step::Field(r[..n].to_string()));
            } else if !(r.is_empty() || r.starts_with('[')) {
                return Err(TemplateError::Syntax(format!(".{r} in {path}")));
            }
            rest = &r[n..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = find_bracket_end(r)
                .ok_or_else(|| TemplateError::Syntax(format!("unclosed [ in {path}")))?;
            steps.push(parse_bracket(r[..end].trim(), path)?);
            rest = &r[end + 1..];
        } else if rest.starts_with(|c: char| c.is_alphabetic()) {
            // `{id}` and `{range items}`: kubectl reads a bare name as a field too.
            let n = name_len(rest);
            steps.push(Step::Field(rest[..n].to_string()));
            rest = &rest[n..];
        } else {
            let what = if rest.contains('(') || rest.contains("==") {
                format!("the expression {rest:?}")
            } else {
                return Err(TemplateError::Syntax(format!("{rest} in {path}")));
            };
            return Err(TemplateError::Unsupported(what));
        }
    }
    Ok(steps)
}

fn find_bracket_end(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == ']' => return Some(i),
            None => {}
        }
    }
    None
}

fn parse_bracket(inner: &str, path: &str) -> Result<Step, TemplateError> {
    if inner == "*" {
        return Ok(Step::All);
    }
    if inner.starts_with('?') {
        return Err(TemplateError::Unsupported(format!("the filter [{inner}]")));
    }
    if let Some(name) = parse_literal(inner)? {
        return Ok(Step::Field(name));
    }
    if inner.contains(',') {
        return Err(TemplateError::Unsupported(format!("the union [{inner}]")));
    }
    let int = |s: &str| -> Result<Option<i64>, TemplateError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<i64>()
            .map(Some)
            .map_err(|_| TemplateError::Syntax(format!("[{inner}] in {path}")))
    };
    match inner.split_once(':') {
        Some((_, tail)) if tail.contains(':') => Err(TemplateError::Unsupported(format!(
            "the stepped slice [{inner}]"
        ))),
        Some((start, end)) => Ok(Step::Slice(int(start)?, int(end)?)),
        None => {
            Ok(Step::Index(int(inner)?.ok_or_else(|| {
                TemplateError::Syntax(format!("[] in {path}"))
            })?))
        }
    }
}

fn render_nodes(nodes: &[Node], root: &Value, current: &Value, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Path(steps) => {
                let found = eval(steps, root, current);
                let shown: Vec<String> = found.iter().map(|v| show(v)).collect();
                out.push_str(&shown.join(" "));
            }
            Node::Range(steps, body) => {
                for item in eval(steps, root, current) {
                    render_nodes(body, root, item, out);
                }
            }
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn eval<'a>(steps: &[Step], root: &'a Value, current: &'a Value) -> Vec<&'a Value> {
    let mut nodes: Vec<&'a Value> = vec![current];
    for step in steps {
        let mut next = Vec::new();
        for node in nodes {
            match step {
                Step::Root => next.push(root),
                // A list printed as an array is a kubectl List: its elements are `.items`.
                Step::Field(name)
                    if name == "items" && node.is_array() && std::ptr::eq(node, root) =>
                {
                    next.push(node)
                }
                Step::Field(name) => next.extend(node.get(name.as_str())),
                Step::Index(i) => {
                    if let Some(items) = node.as_array() {
                        let len = items.len() as i64;
                        let at = if *i < 0 { len + i } else { *i };
                        if (0..len).contains(&at) {
                            next.push(&items[at as usize]);
                        }
                    }
                }
                Step::All => match node {
                    Value::Array(items) => next.extend(items.iter()),
                    Value::Object(map) => next.extend(map.values()),
                    _ => {}
                },
                Step::Slice(start, end) => {
                    if let Some(items) = node.as_array() {
                        let len = items.len() as i64;
                        let clamp = |v: i64| (if v < 0 { len + v } else { v }).clamp(0, len);
                        let from = clamp(start.unwrap_or(0));
                        let to = clamp(end.unwrap_or(len));
                        if from < to {
                            next.extend(items[from as usize..to as usize].iter());
                        }
                    }
                }
                Step::Descend(name) => descend(node, name, &mut next),
            }
        }
        nodes = next;
    }
    nodes
}

fn descend<'a>(node: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
    match node {
        Value::Object(map) => {
            if let Some(v) = map.get(name) {
                out.push(v);
            }
            for v in map.values() {
                descend(v, name, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                descend(v, name, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> Value {
        json!([
            {"id": "b2", "kind": "logical", "raw_bytes": 10, "members": [], "target": {"server": "pg"}},
            {"id": "b1", "kind": "physical", "raw_bytes": 20, "members": ["m1", "m2"]},
        ])
    }

    fn render(template: &str, doc: &Value) -> String {
        Template::parse(template)
            .unwrap_or_else(|e| panic!("{template}: {e}"))
            .render(doc)
    }

    #[test]
    fn fields_indexes_and_wildcards() {
        let doc = list();
        assert_eq!(render("{.items[*].id}", &doc), "b2 b1");
        assert_eq!(render("{[*].id}", &doc), "b2 b1");
        assert_eq!(render("{.items[0].id}", &doc), "b2");
        assert_eq!(render("{.items[-1].id}", &doc), "b1");
        assert_eq!(render("{.items[5].id}", &doc), "");
        assert_eq!(render("{.items[0:1].kind}", &doc), "logical");
        assert_eq!(render("{.items[1].members}", &doc), r#"["m1","m2"]"#);
        assert_eq!(render("{.items[1].members[*]}", &doc), "m1 m2");
        assert_eq!(render("{.items[0].raw_bytes}", &doc), "10");
        assert_eq!(render("{.items[0]['kind']}", &doc), "logical");
        assert_eq!(render("{..server}", &doc), "pg");
        assert_eq!(render("{.items[0].target.*}", &doc), "pg");
        assert_eq!(render("{$.items[0].id}", &doc), "b2");
        let one = json!({"id": "x", "recovery_window": {"latest_lsn": "0/5"}});
        assert_eq!(render("{.id}", &one), "x");
        assert_eq!(render("{.recovery_window.latest_lsn}", &one), "0/5");
        assert_eq!(render("{.missing.field}", &one), "");
    }

    #[test]
    fn range_literals_and_text() {
        let doc = list();
        assert_eq!(
            render(r#"{range .items[*]}{.id}{"\t"}{.kind}{"\n"}{end}"#, &doc),
            "b2\tlogical\nb1\tphysical\n"
        );
        assert_eq!(render("ids: {.items[*].id}!", &doc), "ids: b2 b1!");
        assert_eq!(
            render(
                r#"{range .items[*]}[{.id}:{range .members[*]}{@} {end}]{end}"#,
                &doc
            ),
            "[b2:][b1:m1 m2 ]"
        );
        assert_eq!(render(r#"{'a}b'}"#, &doc), "a}b");
    }

    #[test]
    fn unsupported_and_broken_templates_are_named() {
        let err = |t: &str| Template::parse(t).unwrap_err().to_string();
        assert!(
            err("{.items[?(@.kind==\"set\")].id}").contains("filter"),
            "{}",
            err("{.items[?(@.kind==\"set\")]}")
        );
        assert!(err("{.items[0,1].id}").contains("union"));
        assert!(err("{.items[*].id").contains("unclosed {"));
        assert!(err("{range .items[*]}{.id}").contains("without {end}"));
        assert!(err("{end}").contains("without {range}"));
        assert!(err("{.items[x]}").contains("cannot parse"));
        assert!(err("{.items[::2]}").contains("not supported"));
    }
}
