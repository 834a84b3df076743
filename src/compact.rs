//! JSON text held for a long time by the thousand (the controller's cache, the bulk
//! snapshot), kept LZ4-compressed against a dictionary: the first text the store was
//! given. Deployments of one fleet share nearly every key and most values (server URL,
//! work pool, schemas, tags), so against one of them a 1.4 KB deployment compresses to
//! about 120 bytes; a text with nothing in common with the dictionary still compresses
//! on its own (about 1.5x). Compressing or expanding one text takes microseconds.

use std::sync::OnceLock;

/// Longest dictionary kept: LZ4 looks back at most 64 KiB, and a fleet's common part is
/// far shorter. A huge first text only lends its first part.
const MAX_DICTIONARY: usize = 16 * 1024;

/// A dictionary shared by all texts of one store, fixed by the first text compressed.
pub struct Dictionary(OnceLock<Box<[u8]>>);

impl Dictionary {
    pub const fn new() -> Self {
        Dictionary(OnceLock::new())
    }

    fn get_or_learn(&self, first: &str) -> &[u8] {
        self.0.get_or_init(|| {
            let end = floor_char_boundary(first, MAX_DICTIONARY);
            first.as_bytes()[..end].into()
        })
    }
}

impl Default for Dictionary {
    fn default() -> Self {
        Self::new()
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// One compressed text. Only texts this process compressed are ever expanded, with the
/// dictionary they were compressed against.
#[derive(Clone, PartialEq, Eq)]
pub struct Compact(Box<[u8]>);

impl std::fmt::Debug for Compact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Compact({} bytes)", self.0.len())
    }
}

impl Compact {
    pub fn new(text: &str, dictionary: &Dictionary) -> Compact {
        let dict = dictionary.get_or_learn(text);
        let packed = lz4_flex::block::compress_prepend_size_with_dict(text.as_bytes(), dict);
        Compact(packed.into_boxed_slice())
    }

    /// The text back. Fails only if the bytes were not made by `new` with this
    /// dictionary (a bug), never on input from outside.
    pub fn text(&self, dictionary: &Dictionary) -> Result<String, String> {
        let dict = dictionary.0.get().map_or(&[][..], |d| &d[..]);
        let bytes = lz4_flex::block::decompress_size_prepended_with_dict(&self.0, dict)
            .map_err(|e| format!("compressed text does not expand: {e}"))?;
        String::from_utf8(bytes).map_err(|e| format!("expanded text is not UTF-8: {e}"))
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(i: usize) -> String {
        serde_json::json!({
            "id": format!("6f0e2b3c-1a2b-4c3d-8e9f-{i:012x}"),
            "name": format!("bench-{i}"),
            "flow_id": "1b2c3d4e-0000-4000-8000-00000000abcd",
            "parameters": {"index": i, "label": "bench"},
            "parameter_openapi_schema": {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"}}},
            "schedules": [{"slug": "hourly", "schedule": {"cron": format!("{} * * * *", i % 60), "timezone": "UTC"}}],
            "tags": ["bench", format!("group-{}", i % 10)],
            "work_pool_name": "pool",
            "entrypoint": "flows/bench.py:bench_flow",
        })
        .to_string()
    }

    #[test]
    fn texts_come_back_unchanged_and_similar_ones_are_small() {
        let dict = Dictionary::new();
        let texts: Vec<String> = (0..50).map(deployment).collect();
        let packed: Vec<Compact> = texts.iter().map(|t| Compact::new(t, &dict)).collect();
        for (t, p) in texts.iter().zip(&packed) {
            assert_eq!(&p.text(&dict).expect("expands"), t);
        }
        let raw: usize = texts[1..].iter().map(String::len).sum();
        let held: usize = packed[1..].iter().map(Compact::len).sum();
        assert!(held * 4 < raw, "{held} bytes held for {raw}");
    }

    #[test]
    fn unrelated_and_unusual_texts_round_trip() {
        let dict = Dictionary::new();
        let first = "é".repeat(MAX_DICTIONARY); // cut at a character boundary
        for t in [
            first.as_str(),
            "",
            "{}",
            "\u{0}\u{10FFFF} plain text, not JSON",
            &"x".repeat(200_000),
        ] {
            assert_eq!(Compact::new(t, &dict).text(&dict).expect("expands"), t);
        }
    }

    #[test]
    fn bytes_not_made_here_are_an_error_not_a_panic() {
        let dict = Dictionary::new();
        let _ = Compact::new("{\"a\":1}", &dict);
        for bytes in [
            &[][..],
            &[1, 2][..],
            &[4, 0, 0, 0, 0xF0][..],
            &[3, 0, 0, 0, 0x30, 0xFF][..],
        ] {
            assert!(Compact(bytes.into()).text(&dict).is_err());
        }
    }
}
