//! JSON-RPC 2.0 messages.

use serde_json::{json, Map, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// An error object. Codes below -32000 are JSON-RPC's; positive codes are the node's own
/// stable error codes (see `oxvirt_types::api::ErrorCode`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("no such method {method:?}"))
    }
}

/// A call: `id` is `None` for a notification (no reply is sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: Option<Value>,
    pub method: String,
    /// Named parameters; absent params become an empty object.
    pub params: Map<String, Value>,
}

/// What a request body holds.
#[derive(Debug)]
pub enum Incoming {
    Single(Result<Call, (Value, RpcError)>),
    Batch(Vec<Result<Call, (Value, RpcError)>>),
}

/// Parses a request body. A body that is not JSON at all is an error response by itself.
pub fn parse(body: &[u8]) -> Result<Incoming, Value> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        error_response(
            Value::Null,
            &RpcError::new(PARSE_ERROR, format!("invalid JSON: {e}")),
        )
    })?;
    match v {
        Value::Array(items) if items.is_empty() => Err(error_response(
            Value::Null,
            &RpcError::new(INVALID_REQUEST, "empty batch"),
        )),
        Value::Array(items) => Ok(Incoming::Batch(items.into_iter().map(parse_call).collect())),
        other => Ok(Incoming::Single(parse_call(other))),
    }
}

fn parse_call(v: Value) -> Result<Call, (Value, RpcError)> {
    let invalid = |id: Value, msg: &str| (id, RpcError::new(INVALID_REQUEST, msg));
    let Value::Object(mut o) = v else {
        return Err(invalid(Value::Null, "a request must be an object"));
    };
    let id = o.remove("id");
    if let Some(bad) = id
        .as_ref()
        .filter(|i| !(i.is_string() || i.is_number() || i.is_null()))
    {
        let _ = bad;
        return Err(invalid(Value::Null, "id must be a string, a number or null"));
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if o.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(invalid(reply_id, "jsonrpc must be \"2.0\""));
    }
    let method = match o.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => return Err(invalid(reply_id, "method must be a non-empty string")),
    };
    let params = match o.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err((
                reply_id,
                RpcError::invalid_params("params must be an object of named parameters"),
            ));
        }
    };
    Ok(Call { id, method, params })
}

pub fn success_response(id: Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

pub fn error_response(id: Value, err: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": err.code, "message": err.message } })
}

/// A call as a client sends it.
pub fn request(id: u64, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
}

/// A notification (no id): how the node's event stream carries events.
pub fn notification(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(body: &str) -> Result<Call, (Value, RpcError)> {
        match parse(body.as_bytes()).unwrap() {
            Incoming::Single(c) => c,
            Incoming::Batch(_) => panic!("expected a single call"),
        }
    }

    #[test]
    fn parses_named_params_and_ids() {
        let c = single(r#"{"jsonrpc":"2.0","id":7,"method":"Host.getStats","params":{"a":1}}"#).unwrap();
        assert_eq!(c.id, Some(json!(7)));
        assert_eq!(c.method, "Host.getStats");
        assert_eq!(c.params["a"], 1);
        let n = single(r#"{"jsonrpc":"2.0","method":"X"}"#).unwrap();
        assert!(n.id.is_none() && n.params.is_empty());
    }

    #[test]
    fn rejects_malformed_requests_with_the_right_codes() {
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e["error"]["code"], PARSE_ERROR);
        let (id, e) = single(r#"{"jsonrpc":"1.0","id":"a","method":"X"}"#).unwrap_err();
        assert_eq!((id, e.code), (json!("a"), INVALID_REQUEST));
        let (_, e) = single(r#"{"jsonrpc":"2.0","id":1,"method":"X","params":[1]}"#).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let (_, e) = single(r#"{"jsonrpc":"2.0","id":{},"method":"X"}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let (_, e) = single(r#"{"jsonrpc":"2.0","id":1}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        assert_eq!(parse(b"[]").unwrap_err()["error"]["code"], INVALID_REQUEST);
    }

    #[test]
    fn batches_keep_per_item_results() {
        let Incoming::Batch(items) = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"A"}, 5]"#).unwrap() else {
            panic!("expected a batch")
        };
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().unwrap_err().1.code, INVALID_REQUEST);
    }
}
