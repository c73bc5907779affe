//! The points API a restore drill uses: `scroll_points` (`POST /collections/{c}/points/scroll`)
//! and `query_points` (`POST /collections/{c}/points/query`), following the Qdrant 1.18 OpenAPI
//! document (`docs/redoc/master/openapi.json`).
//!
//! What follows real Qdrant: the request fields the agent sends (`limit`, `offset`,
//! `with_vector`, `with_payload`; `query` as a dense vector, `using`, `params.exact`), the answer
//! shapes (`ScrollResult` `{points: [{id, payload, vector}], next_page_offset}` and
//! `QueryResponse` `{points: [{id, version, score}]}`, nearest first), points ordered by id in a
//! scroll, a Cosine collection answering with its stored vectors normalised (Qdrant normalises
//! them on insert) and scoring by their dot product, and a vector name that does not exist being
//! 400 "Wrong input: Not existing vector name error: NAME".
//!
//! Where it is simpler: the double stores no points. It derives up to [`MAX_POINTS`] points from
//! the collection's bytes (ids 1..=n, each vector from a hash of the collection's fingerprint and
//! the id), so a collection restored from its snapshot answers exactly as the original did and a
//! collection with other bytes answers differently. Search is always exact (a brute-force scan),
//! whatever `params.exact` says; payloads are always empty; scoring is Cosine, the double's only
//! distance.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::data::{self, DataSource, SegmentMeta};

/// Most points a collection of the double exposes through the points API.
pub(crate) const MAX_POINTS: u64 = 256;
/// Largest vector dimension the double generates.
const MAX_DIMENSION: u64 = 4096;

/// The collection's points: `(id, normalised vector)`, ids ascending.
pub(crate) fn points(
    meta: &SegmentMeta,
    data: &DataSource,
) -> std::io::Result<Vec<(u64, Vec<f32>)>> {
    let fingerprint = data::fingerprint(meta, data)?;
    let n = meta.points_count.min(MAX_POINTS);
    let dim = meta.vector_size.clamp(1, MAX_DIMENSION) as usize;
    Ok((1..=n)
        .map(|id| {
            let mut v = Vec::with_capacity(dim);
            let mut block = 0u64;
            while v.len() < dim {
                let mut h = Sha256::new();
                h.update(fingerprint.as_bytes());
                h.update(id.to_le_bytes());
                h.update(block.to_le_bytes());
                for chunk in h.finalize().chunks_exact(4) {
                    if v.len() == dim {
                        break;
                    }
                    let x = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
                    v.push(x as f32 / u32::MAX as f32 * 2.0 - 1.0);
                }
                block += 1;
            }
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            (id, v.into_iter().map(|x| x / norm).collect())
        })
        .collect())
}

/// `ScrollResult` for a scroll request body.
pub(crate) fn scroll(points: &[(u64, Vec<f32>)], body: &Value) -> Value {
    let limit = body["limit"].as_u64().unwrap_or(10).max(1) as usize;
    let offset = body["offset"].as_u64().unwrap_or(0);
    let with_vector = body["with_vector"].as_bool().unwrap_or(false);
    let mut page: Vec<&(u64, Vec<f32>)> = points.iter().filter(|(id, _)| *id >= offset).collect();
    let next = page
        .get(limit)
        .map(|(id, _)| json!(id))
        .unwrap_or(Value::Null);
    page.truncate(limit);
    json!({
        "points": page.iter().map(|(id, v)| {
            let mut p = json!({"id": id, "payload": {}});
            if with_vector {
                p["vector"] = json!(v);
            }
            p
        }).collect::<Vec<_>>(),
        "next_page_offset": next,
    })
}

/// `QueryResponse` for a query request body, or the error message Qdrant gives.
pub(crate) fn query(points: &[(u64, Vec<f32>)], body: &Value) -> Result<Value, String> {
    if let Some(name) = body["using"].as_str().filter(|n| !n.is_empty()) {
        return Err(format!("Not existing vector name error: {name}"));
    }
    let Some(q) = body["query"].as_array() else {
        return Err("the Qdrant double supports only a dense vector as `query`".into());
    };
    let q: Vec<f32> = q.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect();
    let norm = q
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    let limit = body["limit"].as_u64().unwrap_or(10).max(1) as usize;
    let mut scored: Vec<(u64, f32)> = points
        .iter()
        .map(|(id, v)| (*id, v.iter().zip(&q).map(|(a, b)| a * b / norm).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(limit);
    Ok(json!({
        "points": scored.iter().map(|(id, s)| json!({"id": id, "version": 0, "score": s})).collect::<Vec<_>>()
    }))
}
