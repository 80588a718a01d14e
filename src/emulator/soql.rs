//! The SOQL subset the service uses:
//! `SELECT f1, Parent.f2, TYPEOF Rel WHEN Type THEN f3, f4 END FROM Obj
//! [WHERE f = 'v' [AND Parent.f IN ('a','b') | f != v …]] [LIMIT n]`.
//!
//! A dotted name follows a parent relationship (`Event.BookMe__Booking_Id__c` from
//! EventRelation, whose `EventId` has the relationship name `Event`). A polymorphic relationship
//! (`Relation` of EventRelation: User, Contact or Lead) only offers the fields of every target
//! through a dotted name; the fields of one target type need `TYPEOF`
//! (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_typeof.htm).

use serde_json::Value;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Selected fields, as written (plain or dotted).
    pub fields: Vec<String>,
    /// Selected `TYPEOF` clauses.
    pub typeofs: Vec<TypeOf>,
    /// The sObject.
    pub sobject: String,
    /// Conditions joined by AND.
    pub conditions: Vec<Condition>,
    /// Row limit.
    pub limit: Option<usize>,
}

/// `TYPEOF Relationship WHEN Type THEN f1, f2 … END`: the fields to read from the related
/// record, by its type.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeOf {
    /// The polymorphic relationship, e.g. `Relation`.
    pub relationship: String,
    /// sObject type → fields.
    pub whens: Vec<(String, Vec<String>)>,
}

/// One `field op value` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Field name.
    pub field: String,
    /// Equality or membership.
    pub op: Op,
    /// Literal values (one, or several for IN).
    pub values: Vec<Value>,
}

/// Comparison operators of the subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `IN (…)`
    In,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Symbol(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            ',' | '(' | ')' | '=' => {
                chars.next();
                tokens.push(Token::Symbol(match c {
                    ',' => ",",
                    '(' => "(",
                    ')' => ")",
                    _ => "=",
                }));
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("unexpected token: '!'".into());
                }
                tokens.push(Token::Symbol("!="));
            }
            '\'' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => match chars.next() {
                            Some(escaped) => value.push(escaped),
                            None => return Err("unterminated string".into()),
                        },
                        Some('\'') => break,
                        Some(other) => value.push(other),
                        None => return Err("unterminated string".into()),
                    }
                }
                tokens.push(Token::Str(value));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || matches!(c, '_' | '.' | '-') {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if word.is_empty() {
                    return Err(format!("unexpected token: '{c}'"));
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

fn literal(token: Option<Token>) -> Result<Value, String> {
    match token {
        Some(Token::Str(s)) => Ok(Value::String(s)),
        Some(Token::Word(w)) => match w.to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "null" => Ok(Value::Null),
            _ => w
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("unexpected token: '{w}'")),
        },
        other => Err(format!("expected a value, found {other:?}")),
    }
}

/// Parses the subset; the error reads like Salesforce's MALFORMED_QUERY message.
pub fn parse(text: &str) -> Result<Query, String> {
    let mut tokens = tokenize(text)?.into_iter().peekable();
    let keyword = |token: Option<Token>, expected: &str| match token {
        Some(Token::Word(w)) if w.eq_ignore_ascii_case(expected) => Ok(()),
        other => Err(format!("expected {expected}, found {other:?}")),
    };
    keyword(tokens.next(), "SELECT")?;
    let mut fields = Vec::new();
    let mut typeofs = Vec::new();
    loop {
        match tokens.next() {
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("TYPEOF") => {
                let relationship = match tokens.next() {
                    Some(Token::Word(r)) => r,
                    other => return Err(format!("expected a relationship, found {other:?}")),
                };
                let mut whens = Vec::new();
                loop {
                    match tokens.next() {
                        Some(Token::Word(w)) if w.eq_ignore_ascii_case("WHEN") => {}
                        Some(Token::Word(w))
                            if w.eq_ignore_ascii_case("END") && !whens.is_empty() =>
                        {
                            break;
                        }
                        other => return Err(format!("expected WHEN or END, found {other:?}")),
                    }
                    let sobject = match tokens.next() {
                        Some(Token::Word(t)) => t,
                        other => return Err(format!("expected a type, found {other:?}")),
                    };
                    keyword(tokens.next(), "THEN")?;
                    let mut then = Vec::new();
                    loop {
                        match tokens.next() {
                            Some(Token::Word(f)) => then.push(f),
                            other => return Err(format!("expected a field, found {other:?}")),
                        }
                        if tokens.peek() == Some(&Token::Symbol(",")) {
                            tokens.next();
                        } else {
                            break;
                        }
                    }
                    whens.push((sobject, then));
                }
                typeofs.push(TypeOf {
                    relationship,
                    whens,
                });
            }
            Some(Token::Word(w)) => fields.push(w),
            other => return Err(format!("expected a field, found {other:?}")),
        }
        match tokens.peek() {
            Some(Token::Symbol(",")) => {
                tokens.next();
            }
            _ => break,
        }
    }
    keyword(tokens.next(), "FROM")?;
    let sobject = match tokens.next() {
        Some(Token::Word(w)) => w,
        other => return Err(format!("expected an object, found {other:?}")),
    };
    let mut conditions = Vec::new();
    let mut limit = None;
    while let Some(token) = tokens.next() {
        let Token::Word(word) = token else {
            return Err(format!("unexpected token: {token:?}"));
        };
        match word.to_ascii_uppercase().as_str() {
            "WHERE" | "AND" => {
                let field = match tokens.next() {
                    Some(Token::Word(w)) => w,
                    other => return Err(format!("expected a field, found {other:?}")),
                };
                let condition = match tokens.next() {
                    Some(Token::Symbol("=")) => Condition {
                        field,
                        op: Op::Eq,
                        values: vec![literal(tokens.next())?],
                    },
                    Some(Token::Symbol("!=")) => Condition {
                        field,
                        op: Op::Ne,
                        values: vec![literal(tokens.next())?],
                    },
                    Some(Token::Word(w)) if w.eq_ignore_ascii_case("IN") => {
                        if tokens.next() != Some(Token::Symbol("(")) {
                            return Err("expected ( after IN".into());
                        }
                        let mut values = vec![literal(tokens.next())?];
                        loop {
                            match tokens.next() {
                                Some(Token::Symbol(",")) => values.push(literal(tokens.next())?),
                                Some(Token::Symbol(")")) => break,
                                other => return Err(format!("expected , or ), found {other:?}")),
                            }
                        }
                        Condition {
                            field,
                            op: Op::In,
                            values,
                        }
                    }
                    other => return Err(format!("expected an operator, found {other:?}")),
                };
                conditions.push(condition);
            }
            "LIMIT" => {
                limit = Some(match tokens.next() {
                    Some(Token::Word(w)) => w.parse().map_err(|_| format!("bad LIMIT {w}"))?,
                    other => return Err(format!("expected a number, found {other:?}")),
                });
            }
            other => return Err(format!("unexpected token: '{other}'")),
        }
    }
    Ok(Query {
        fields,
        typeofs,
        sobject,
        conditions,
        limit,
    })
}

fn equal(stored: Option<&Value>, literal: &Value) -> bool {
    match (stored.unwrap_or(&Value::Null), literal) {
        // SOQL string comparison is case-insensitive.
        (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

impl Condition {
    /// True when the record's fields satisfy the condition.
    pub fn matches(&self, fields: &serde_json::Map<String, Value>) -> bool {
        self.matches_value(
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&self.field))
                .map(|(_, v)| v),
        )
    }

    /// True when the condition's field, resolved by the caller (a dotted name follows a
    /// relationship), has a matching value.
    pub fn matches_value(&self, stored: Option<&Value>) -> bool {
        match self.op {
            Op::Eq => equal(stored, &self.values[0]),
            Op::Ne => !equal(stored, &self.values[0]),
            Op::In => self.values.iter().any(|v| equal(stored, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subset() {
        let q = parse(
            "SELECT Id, Email FROM User WHERE Email = 'o\\'brien@x.example' AND IsActive = true \
             AND Username IN ('a', 'b') LIMIT 1",
        )
        .unwrap();
        assert_eq!(q.fields, vec!["Id", "Email"]);
        assert_eq!(q.sobject, "User");
        assert_eq!(q.conditions.len(), 3);
        assert_eq!(
            q.conditions[0].values[0],
            Value::String("o'brien@x.example".into())
        );
        assert_eq!(q.conditions[2].op, Op::In);
        assert_eq!(q.limit, Some(1));
    }

    #[test]
    fn parses_relationships_and_typeof() {
        let q = parse(
            "SELECT Id, Event.BookMe__Booking_Id__c, TYPEOF Relation WHEN Lead THEN Id, \
             BookMe__Lead_Key__c END, IsParent FROM EventRelation \
             WHERE Event.BookMe__Booking_Id__c IN ('bk_1', 'bk_2')",
        )
        .unwrap();
        assert_eq!(q.fields, ["Id", "Event.BookMe__Booking_Id__c", "IsParent"]);
        assert_eq!(
            q.typeofs,
            [TypeOf {
                relationship: "Relation".into(),
                whens: vec![(
                    "Lead".into(),
                    vec!["Id".into(), "BookMe__Lead_Key__c".into()]
                )],
            }]
        );
        assert_eq!(q.conditions[0].field, "Event.BookMe__Booking_Id__c");
        assert!(parse("SELECT TYPEOF Relation END FROM EventRelation").is_err());
        assert!(parse("SELECT TYPEOF Relation WHEN Lead Id END FROM EventRelation").is_err());
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        assert!(parse("SELECT FROM User").is_err());
        assert!(parse("SELECT Id FROM User WHERE Email LIKE 'x'").is_err());
        assert!(parse("SELECT Id FROM User ORDER BY Id").is_err());
        assert!(parse("DELETE Id FROM User").is_err());
    }

    #[test]
    fn string_matching_is_case_insensitive() {
        let q = parse("SELECT Id FROM User WHERE Email = 'SARA.REP@ACME.EXAMPLE'").unwrap();
        let mut fields = serde_json::Map::new();
        fields.insert("Email".into(), "sara.rep@acme.example".into());
        assert!(q.conditions[0].matches(&fields));
    }
}
