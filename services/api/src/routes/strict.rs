//! JSON request bodies hold the types the document declares: a `string` field given a number
//! or `true` is refused with `400` naming the field, as an `integer` given `"5"` already is.
//! poem-openapi reads a JSON number or boolean into a `String` as its text, so without this
//! `{"name": false}` would make a user named `false`.
//!
//! The check reads the document once (the one served at `/openapi.json`) and, for a request
//! to an operation with a JSON body, compares the body's values with the declared types,
//! following `$ref`s, object properties, array items and map values. `null` passes where
//! the document says `nullable` (an optional field without a default, written inline), and
//! nowhere else. Everything else the handlers check.

use poem::{Endpoint, IntoResponse, Middleware, Request, Response};
use serde_json::Value;

use crate::problem::ApiError;

/// The middleware.
pub(crate) struct StrictTypes(&'static Value);

impl StrictTypes {
    /// Over the served document.
    pub(crate) fn of_description() -> Self {
        Self(super::spec())
    }
}

impl<E: Endpoint> Middleware<E> for StrictTypes {
    type Output = StrictTypesEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        StrictTypesEndpoint {
            inner,
            spec: self.0,
        }
    }
}

pub(crate) struct StrictTypesEndpoint<E> {
    inner: E,
    spec: &'static Value,
}

impl<E: Endpoint> Endpoint for StrictTypesEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut request: Request) -> poem::Result<Response> {
        let is_json = request
            .content_type()
            .is_some_and(|t| t.starts_with("application/json"));
        let schema = is_json
            .then(|| body_schema(self.spec, request.method().as_str(), request.uri().path()))
            .flatten();
        if let Some(schema) = schema {
            let body = request.take_body().into_bytes().await?;
            if let Ok(value) = serde_json::from_slice::<Value>(&body)
                && let Err((field, expected)) = check(self.spec, &value, schema, "")
            {
                let field = if field.is_empty() { None } else { Some(field) };
                let detail = match &field {
                    Some(field) => format!("`{field}` must be {expected}"),
                    None => format!("the body must be {expected}"),
                };
                return Ok(ApiError::bad_request(detail, field.as_deref()).into_response());
            }
            request.set_body(body);
        }
        self.inner
            .call(request)
            .await
            .map(IntoResponse::into_response)
    }
}

/// The JSON body schema of `method path`, if the document declares one.
fn body_schema<'a>(spec: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    let paths = spec["paths"].as_object()?;
    let template = super::template_of(paths.keys().map(String::as_str), path)?;
    let operations = &paths[template];
    let content = operations[method.to_ascii_lowercase()]["requestBody"]["content"].as_object()?;
    content
        .iter()
        .find(|(media, _)| media.starts_with("application/json"))
        .map(|(_, media)| &media["schema"])
}

/// Whether `value` has the types `schema` declares; the first field that does not, with what
/// it should be.
fn check<'a>(
    spec: &'a Value,
    value: &Value,
    mut schema: &'a Value,
    field: &str,
) -> Result<(), (String, &'static str)> {
    // `$ref`s lead to components; a few hops at most, bounded against a loop.
    for _ in 0..8 {
        match schema["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
        {
            Some(name) => schema = &spec["components"]["schemas"][name],
            None => break,
        }
    }
    if value.is_null() && schema["nullable"] == Value::Bool(true) {
        return Ok(());
    }
    let fits = match schema["type"].as_str() {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("object") => value.is_object(),
        _ => true,
    };
    if !fits {
        let expected = match schema["type"].as_str() {
            Some("string") => "a string",
            Some("integer") => "an integer",
            Some("number") => "a number",
            Some("boolean") => "true or false",
            Some("array") => "an array",
            _ => "an object",
        };
        return Err((field.to_owned(), expected));
    }
    let join = |name: &str| {
        if field.is_empty() {
            name.to_owned()
        } else {
            format!("{field}.{name}")
        }
    };
    match value {
        Value::Object(object) => {
            for (name, item) in object {
                if let Some(declared) = schema["properties"].get(name) {
                    check(spec, item, declared, &join(name))?;
                } else if schema["additionalProperties"].is_object() {
                    check(spec, item, &schema["additionalProperties"], &join(name))?;
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (index, item) in items.iter().enumerate() {
                check(spec, item, &schema["items"], &format!("{field}[{index}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({
            "paths": {
                "/api/v1/users": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewUser"}}}}}},
                "/api/v1/users/{name}": {"patch": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Patch"}}}}}},
                "/api/v1/users/me": {"get": {}}
            },
            "components": {"schemas": {
                "NewUser": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "count": {"type": "integer"}
                }},
                "Patch": {"type": "object", "properties": {"role": {"type": "string", "nullable": true}, "nested": {"$ref": "#/components/schemas/Patch"}}}
            }}
        })
    }

    fn checked(path: &str, method: &str, body: Value) -> Result<(), (String, &'static str)> {
        let spec = spec();
        let schema = body_schema(&spec, method, path).expect("a body schema");
        check(&spec, &body, schema, "")
    }

    #[test]
    fn a_number_or_a_boolean_where_a_string_is_declared_is_refused_naming_the_field() {
        assert_eq!(
            checked("/api/v1/users", "post", json!({"name": false})),
            Err(("name".into(), "a string"))
        );
        assert_eq!(
            checked(
                "/api/v1/users",
                "post",
                json!({"name": "a", "tags": ["x", 3]})
            ),
            Err(("tags[1]".into(), "a string"))
        );
        assert_eq!(
            checked(
                "/api/v1/users",
                "post",
                json!({"name": "a", "env": {"K": 1}})
            ),
            Err(("env.K".into(), "a string"))
        );
        assert_eq!(
            checked("/api/v1/users", "post", json!({"name": "a", "count": "5"})),
            Err(("count".into(), "an integer"))
        );
        assert_eq!(
            checked("/api/v1/users", "post", json!(["name"])),
            Err(("".into(), "an object"))
        );
    }

    #[test]
    fn declared_types_and_null_for_an_optional_field_pass() {
        assert_eq!(
            checked(
                "/api/v1/users",
                "post",
                json!({"name": "a", "tags": ["x"], "count": 2, "env": {"K": "v"}, "unknown": 1})
            ),
            Ok(())
        );
        assert_eq!(
            checked("/api/v1/users/alice", "patch", json!({"role": null})),
            Ok(())
        );
        assert_eq!(
            checked("/api/v1/users/alice", "patch", json!({"nested": null})),
            Err(("nested".into(), "an object")),
            "a reference is not nullable"
        );
        assert_eq!(
            checked("/api/v1/users", "post", json!({"name": null})),
            Err(("name".into(), "a string")),
            "a required field is not optional"
        );
    }

    #[test]
    fn only_operations_with_a_json_body_are_checked() {
        let spec = spec();
        assert!(body_schema(&spec, "GET", "/api/v1/users/me").is_none());
        assert!(body_schema(&spec, "POST", "/api/v1/nowhere").is_none());
        assert!(body_schema(&spec, "PATCH", "/api/v1/users/bob").is_some());
    }
}
