//! The streaming scanner against `extract_model` (serde_json on the whole body): same verdict kind
//! and the same model, whatever the chunking; and its throughput.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::body::{extract_model, BodyError, MAX_MODEL_LEN};
use filter::body_scan::{scan, Scanner};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::mem::discriminant;
use std::time::Instant;

/// Feeds `body` cut at `cuts` (sorted or not, clamped); stops at the first error like the filter.
fn chunked(body: &[u8], cuts: &[usize]) -> Result<String, BodyError> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
    cuts.sort_unstable();
    let mut s = Scanner::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([body.len()]) {
        s.feed(&body[from..c])?;
        from = c;
    }
    s.finish()
}

fn bytewise(body: &[u8]) -> Result<String, BodyError> {
    let mut s = Scanner::new();
    for b in body {
        s.feed(std::slice::from_ref(b))?;
    }
    s.finish()
}

/// Where serde's verdict is knowingly not ours (see the body_scan module doc): serde builds a
/// `Value` for the model, so a model that is an array nested 127+ deep, or holds a number beyond
/// f64, fails there as NotJson (and serde stops, never seeing a later duplicate key). The body is
/// refused either way; the scanner says ModelNotString (the real reason) or DuplicateModel.
fn serde_builds_value_and_fails(serde: &Result<String, BodyError>) -> bool {
    matches!(serde, Err(BodyError::NotJson(m)) if m.starts_with("recursion limit exceeded") || m.starts_with("number out of range"))
}

/// The verdict's kind: the `BodyError` variant (`Result`'s own discriminant only tells Ok from Err).
fn kind(r: &Result<String, BodyError>) -> Option<std::mem::Discriminant<BodyError>> {
    r.as_ref().err().map(discriminant)
}

/// The differential check; returns serde's verdict, as a name for tallies.
fn check(body: &[u8], cuts: &[usize]) -> &'static str {
    let whole = scan(body);
    // Chunking never changes the verdict, not even the message (positions are absolute).
    assert_eq!(chunked(body, cuts), whole, "cuts {cuts:?} of {:?}", String::from_utf8_lossy(body));
    assert_eq!(bytewise(body), whole, "byte by byte: {:?}", String::from_utf8_lossy(body));
    let serde = extract_model(body);
    if let Ok(m) = &whole {
        // Holds for any bytes: what the scanner accepts serde accepts, with the same model.
        assert_eq!(serde.as_ref(), Ok(m), "{:?}", String::from_utf8_lossy(body));
    }
    // serde does not validate UTF-8 in strings it skips; the scanner does: compare on UTF-8 only.
    if std::str::from_utf8(body).is_ok() && !serde_builds_value_and_fails(&serde) {
        assert_eq!(kind(&whole), kind(&serde), "{:?}: scanner {whole:?}, serde {serde:?}", String::from_utf8_lossy(body));
        if serde.is_ok() {
            assert_eq!(whole, serde);
        }
    }
    match &serde {
        _ if serde_builds_value_and_fails(&serde) => "excluded",
        Ok(_) => "ok",
        Err(BodyError::NotJson(_)) => "not_json",
        Err(BodyError::NotObject) => "not_object",
        Err(BodyError::MissingModel) => "missing",
        Err(BodyError::ModelNotString) => "not_string",
        Err(BodyError::DuplicateModel) => "duplicate",
        Err(BodyError::ModelTooLong) => "too_long",
    }
}

/// Any byte, mostly from JSON's alphabet (and bytes of valid and invalid UTF-8).
fn json_byte() -> impl Strategy<Value = u8> {
    prop_oneof![1 => any::<u8>(), 3 => prop::sample::select(b"{}[]\":,\\ 0123456789-+.eEtrufalsnu\x00\xc3\xa9\xff\xed\xa0\x80\xf0\x9f".to_vec())]
}

fn ws() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", "", "", " ", "\n", "\t", "\r\n  ", "  "])
}

/// Pieces of string contents: plain text, every escape, surrogate pairs, lone surrogates (which
/// serde skips but refuses where it decodes), non-ASCII, and words the scanner looks for.
fn str_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a",
        "hello world",
        "model",
        "mod",
        "el",
        "gpt-4o",
        r#"\""#,
        r"\\",
        r"\/",
        r"\b",
        r"\f",
        r"\n",
        r"\r",
        r"\t",
        r"\u00e9",
        r"\u4E2D",
        r"\u0000",
        r"\u001f",
        r"\ud83d\ude00",
        r"\uD83D\uDE00",
        r"\ud800",
        r"\udc00",
        r"\ud800\u0041",
        "é",
        "中文",
        "😀",
        "\u{7f}",
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
    ])
}

fn string_lit() -> impl Strategy<Value = String> {
    prop::collection::vec(str_piece(), 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn number() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "0",
        "-0",
        "1",
        "-12",
        "3.25",
        "0.5",
        "1e5",
        "1E+2",
        "-0.0e-7",
        "2e-3",
        "123456789012345678901234567890",
        "1e400",
        "-1e999",
    ])
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("\"model\"".to_string()),
        2 => prop::sample::select(vec![
            r#""mod\u0065l""#, r#""\u006dodel""#, r#""modeL""#, r#""models""#, r#""mode""#, r#""""#, r#""messages""#, r#""stream""#,
            r#""m\ud800""#, r#""model ""#,
        ]).prop_map(str::to_string),
        2 => string_lit(),
    ]
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        8 => string_lit(),
        4 => number().prop_map(str::to_string),
        3 => prop::sample::select(vec!["true", "false", "null"]).prop_map(str::to_string),
        // Deep, but within serde's skip and our cap; as a model it crosses serde's recursion limit.
        1 => prop::sample::select(vec![10usize, 100, 126, 127, 128, 2000]).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            (prop::collection::vec((ws(), inner.clone(), ws()), 0..5)).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                format!("[{}]", items.join(","))
            }),
            (prop::collection::vec((key(), ws(), inner), 0..5)).prop_map(|entries| {
                let entries: Vec<String> = entries.into_iter().map(|(k, w, v)| format!("{k}{w}:{w}{v}")).collect();
                format!("{{{}}}", entries.join(","))
            }),
        ]
    })
}

/// What a model value is: mostly strings, at and around the length limit too.
fn model_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => string_lit(),
        2 => (0usize..=MAX_MODEL_LEN + 2, prop::sample::select(vec!["x", "é", r"\u00e9", "😀"]))
            .prop_map(|(n, c)| format!("\"{}\"", c.repeat(n / if c == "😀" { 4 } else if c == "é" { 2 } else { 1 }))),
        1 => Just(format!("\"{}\"", "m".repeat(MAX_MODEL_LEN))),
        2 => Just(format!("\"{}\"", "m".repeat(MAX_MODEL_LEN + 1))),
        2 => value(),
    ]
}

fn document() -> impl Strategy<Value = String> {
    let other = (ws(), (key(), value()), ws());
    let model = (ws(), (prop_oneof![3 => Just("\"model\"".to_string()), 1 => key()], model_value()), ws());
    let object = (
        ws(),
        prop::collection::vec(other, 0..5),
        (prop::sample::select(vec![0usize, 1, 1, 1, 1, 1, 1, 2]), prop::collection::vec((any::<prop::sample::Index>(), model), 2)),
        ws(),
    )
        .prop_map(|(a, mut entries, (n, models), b)| {
            for (at, m) in models.into_iter().take(n) {
                let at = at.index(entries.len() + 1);
                entries.insert(at, m);
            }
            let entries: Vec<String> = entries.into_iter().map(|(w, (k, v), w2)| format!("{w}{k}{w2}:{w}{v}{w2}")).collect();
            format!("{a}{{{}}}{b}", entries.join(","))
        });
    prop_oneof![6 => object, 1 => (ws(), value(), ws()).prop_map(|(a, v, b)| format!("{a}{v}{b}"))]
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Replace(prop::sample::Index, char),
    Insert(prop::sample::Index, &'static str),
    /// Inserted next to a structural byte or digit, where grammar mistakes are likeliest to matter.
    InsertAtToken(prop::sample::Index, &'static str),
    Delete(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let ch = prop::sample::select(vec![
        '{', '}', '[', ']', '"', ':', ',', '\\', ' ', '0', '1', '-', '+', '.', 'e', 'E', 'a', 'n', 't', 'u', 'l', 'x', '\0', '\t', '\n',
        '\u{1f}', '\u{c}', 'é', '中',
    ]);
    let junk = prop::sample::select(vec![
        "x",
        ",",
        ",,",
        "}",
        "{",
        "]",
        "[",
        "\"",
        "\\",
        "\\u",
        "\\ud800",
        "\\x",
        "\\a",
        "\\U0041",
        "\\u12",
        "\"model\":",
        "\"model\":\"b\",",
        "null",
        "01",
        "1.",
        ".5",
        "+1",
        "1e",
        "e5",
        "0",
        ",}",
        ",]",
        ":1",
        "tru",
        "\u{0}",
        "\u{c}",
        " ",
        "é",
    ]);
    prop_oneof![
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => (any::<prop::sample::Index>(), ch).prop_map(|(i, c)| Mutation::Replace(i, c)),
        1 => (any::<prop::sample::Index>(), junk.clone()).prop_map(|(i, j)| Mutation::Insert(i, j)),
        2 => (any::<prop::sample::Index>(), junk).prop_map(|(i, j)| Mutation::InsertAtToken(i, j)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
    ]
}

/// Applies mutations at char boundaries, so the body stays UTF-8 and the comparison applies.
fn mutate(mut text: String, mutations: &[Mutation]) -> String {
    for m in mutations {
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let at = |i: &prop::sample::Index| bounds[i.index(bounds.len())];
        match m {
            Mutation::Truncate(i) => text.truncate(at(i)),
            Mutation::Insert(i, s) => text.insert_str(at(i), s),
            Mutation::InsertAtToken(i, s) => {
                let tokens: Vec<usize> =
                    text.match_indices(|c: char| "{}[]:,\"".contains(c) || c.is_ascii_digit()).flat_map(|(p, _)| [p, p + 1]).collect();
                if !tokens.is_empty() {
                    text.insert_str(tokens[i.index(tokens.len())], s);
                }
            }
            Mutation::Replace(..) | Mutation::Delete(_) if text.is_empty() => {}
            Mutation::Replace(i, c) => {
                let p = at(i).min(bounds[bounds.len() - 2]);
                text.remove(p);
                text.insert(p, *c);
            }
            Mutation::Delete(i) => {
                let p = at(i).min(bounds[bounds.len() - 2]);
                text.remove(p);
            }
        }
    }
    text
}

fn case() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let muts = prop_oneof![1 => Just(vec![]), 1 => prop::collection::vec(mutation(), 1..3)];
    (document(), muts, prop::collection::vec(0usize..4096, 0..6)).prop_map(|(doc, muts, cuts)| {
        let body = mutate(doc, &muts).into_bytes();
        let cuts = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
        (body, cuts)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn scanner_agrees_with_extract_model((body, cuts) in case()) {
        check(&body, &cuts);
    }

    #[test]
    fn scanner_on_any_bytes((body, cuts) in (prop::collection::vec(json_byte(), 0..256), prop::collection::vec(0usize..256, 0..4))) {
        check(&body, &cuts);
    }

    /// Bytes that are mostly JSON punctuation and invalid UTF-8 next to valid documents.
    #[test]
    fn scanner_on_documents_with_raw_bytes((body, cuts) in case(), at in any::<prop::sample::Index>(), raw in prop::collection::vec(any::<u8>(), 1..4)) {
        let mut body = body;
        let p = at.index(body.len() + 1);
        body.splice(p..p, raw);
        check(&body, &cuts);
    }
}

/// The generator reaches every verdict (so the property is not vacuous), and the excluded class is small.
#[test]
fn generated_cases_cover_every_verdict() {
    let mut runner = TestRunner::deterministic();
    let strategy = case();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for _ in 0..3000 {
        let (body, cuts) = strategy.new_tree(&mut runner).expect("a case").current();
        let kind = check(&body, &cuts);
        *seen.entry(kind).or_default() += 1;
    }
    eprintln!("verdicts over 3000 generated bodies: {seen:?}");
    for kind in ["ok", "not_json", "not_object", "missing", "not_string", "duplicate", "too_long"] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 20, "{kind} too rare: {seen:?}");
    }
    assert!(seen.get("excluded").copied().unwrap_or(0) < 300, "{seen:?}");
}

fn fixed_bodies() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"there\" \u00e9\ud83d\ude00","model":"x"}],"stream":true,"n":-1.5e+3}"#[..],
        br#" {"mod\u0065l" : "a\/b\\c\n" , "x":[ null,true,false,0,-0,1E2,{"model":{}} ] } "#,
        "{\"model\":\"模型-é😀\",\"t\":\"中文 text\"}".as_bytes(),
        br#"{"model":"a","model":"b"}"#,
        br#"{"x":1,"model":null}"#,
        br#"{"model":""}"#,
        br#"{"model":[1,{"a":"b"}]}"#,
        br#"{"model":12.5e-1}"#,
        br#"{"model":"a","x":"\ud800 lone skipped"}"#,
        br#"{"model":"\ud800\u0041"}"#,
        br#"{"model":["\udc00"]}"#,
        br#"{"model":[1],"x":"\ud800"}"#,
        br#"{"x":{"y":"\ud800"},"model":"m"}"#,
        br#"{"model":"a","n":01}"#,
        br#"{"model":"a","n":1.}"#,
        br#"{"model":"a","x":[1,2,],"y":3}"#,
        br#"{"model":"a"}}"#,
        br#"{"model":"a","x":[1}}"#,
        br#"{"model":"a","x":{"y":1]}"#,
        br#"{"model" "a"}"#,
        br#"{"model":"a\x"}"#,
        br#"{"model":"a","x":"\a"}"#,
        b"{\"model\":\"a\x01\"}",
        b"{\"model\":\"a\",\"x\":\"\xe4\xb8\"}",
        b"{\"model\":\"\xf0\x9f\x98\x80\xf0\x9f\x98\"}",
        b"[1, [2, {\"model\": \"x\"}], \"s\", -0.25e-2, true]",
        b"  -12.5e+07  ",
        b"0",
        b"-",
        b"nul",
        b"\"str\\u00e9\"",
        b"",
        b" \r\n\t",
        b"\x0c{}",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    v.push(format!("{{\"model\":\"{}\",\"pad\":\"{}\"}}", "é".repeat(MAX_MODEL_LEN / 2), "ab".repeat(40)).into_bytes());
    v.push(format!("{{\"model\":\"{}\"}}", "x".repeat(MAX_MODEL_LEN + 1)).into_bytes());
    v
}

/// Every single split point, every pair of split points (short bodies), and byte by byte.
#[test]
fn every_split_point_of_fixed_bodies() {
    for body in fixed_bodies() {
        check(&body, &[]);
        let n = body.len();
        for k in 0..=n {
            check(&body, &[k]);
        }
        if n <= 90 {
            for j in 0..=n {
                for k in j..=n {
                    assert_eq!(chunked(&body, &[j, k]), scan(&body));
                }
            }
        }
    }
}

/// Message texts: English prose with a `\n` per line, escapes and non-ASCII mixed in, and Chinese.
const TEXTS: [(&str, &str); 3] = [
    ("english", "The quick brown fox jumps over the lazy dog, and then it runs back home again.\\n"),
    ("mixed", "The quick brown fox; \\\"quoted\\\" and caf\\u00e9, 中文 and 😀. "),
    ("chinese", "敏捷的棕色狐狸跳过了懒狗，然后又跑回家了。这是一个测试句子。"),
];

/// A chat body of about `size` bytes, model last (the worst case: all of it is scanned).
fn chat_body(text: &str, size: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    let mut len = 0;
    while len < size {
        let content: String = text.repeat((size / text.len()).clamp(1, 8));
        len += content.len() + 40;
        messages.push(format!("{{\"role\":\"user\",\"content\":\"{content}\"}}"));
    }
    format!("{{\"messages\":[{}],\"temperature\":0.7,\"max_tokens\":1024,\"stream\":true,\"model\":\"gpt-4o-mini\"}}", messages.join(","))
        .into_bytes()
}

fn rate(bytes: usize, f: &mut dyn FnMut()) -> f64 {
    let start = Instant::now();
    let mut rounds = 0usize;
    while rounds < 3 || start.elapsed().as_millis() < 200 {
        f();
        rounds += 1;
    }
    (bytes * rounds) as f64 / start.elapsed().as_secs_f64()
}

/// Not a benchmark harness, numbers for the record (not asserted):
/// `cargo test -p filter --profile bench-tools --test body_scan -- --nocapture throughput`.
#[test]
fn throughput() {
    let build = if cfg!(debug_assertions) { "debug build, meaningless" } else { "optimised" };
    for (name, text) in TEXTS {
        let big = chat_body(text, 1 << 20);
        assert_eq!(chunked(&big, &[]), Ok("gpt-4o-mini".into()));
        assert_eq!(extract_model(&big), Ok("gpt-4o-mini".into()));
        let scanner = rate(big.len(), &mut || {
            let mut s = Scanner::new();
            for c in big.chunks(16 * 1024) {
                s.feed(std::hint::black_box(c)).expect("valid");
            }
            assert!(s.finish().is_ok());
        });
        let serde = rate(big.len(), &mut || assert!(extract_model(std::hint::black_box(&big)).is_ok()));
        eprintln!(
            "body scan ({build}), 1 MB {name} body in 16 KB chunks: {:.0} MB/s (serde on the whole body: {:.0} MB/s)",
            scanner / 1e6,
            serde / 1e6
        );
    }
    let small = chat_body(TEXTS[0].1, 800);
    let scanner = rate(small.len(), &mut || assert!(scan(std::hint::black_box(&small)).is_ok()));
    let serde = rate(small.len(), &mut || assert!(extract_model(std::hint::black_box(&small)).is_ok()));
    let ns = |r: f64| small.len() as f64 / r * 1e9;
    eprintln!(
        "body scan ({build}), {} B english body: {:.0} ns ({:.0} MB/s; serde {:.0} ns)",
        small.len(),
        ns(scanner),
        scanner / 1e6,
        ns(serde)
    );
}
