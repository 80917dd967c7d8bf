//! Table-driven tests: the spec's §1.4 vectors, Calico's parser_test.go vectors, error positions,
//! canonical forms and IDs, plus property tests (no panics; canonical form round-trips).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(s: &str) -> Selector {
    match Selector::parse(s) {
        Ok(sel) => sel,
        Err(e) => panic!("{s:?} should parse:\n{e}"),
    }
}

/// The label sets of spec §1.4.
fn spec_sets() -> Vec<(char, BTreeMap<String, String>)> {
    vec![
        (
            'A',
            labels(&[("role", "db"), ("env", "prod"), ("tier", "backend")]),
        ),
        ('B', labels(&[("role", "web"), ("env", "dev")])),
        ('C', labels(&[])),
        (
            'D',
            labels(&[
                ("projectcalico.org/namespace", "ns1"),
                ("projectcalico.org/orchestrator", "k8s"),
                ("pcns.team", "a"),
                ("pcns.projectcalico.org/name", "ns1"),
                ("app", "api"),
            ]),
        ),
        (
            'E',
            labels(&[
                ("kubernetes.io/hostname", "node-1"),
                ("node-role.kubernetes.io/control-plane", ""),
                ("host-endpoint", "true"),
            ]),
        ),
        (
            'F',
            labels(&[("msg", r#"say "hi""#), ("a", "x"), ("c", "z")]),
        ),
    ]
}

/// Spec §1.4: selector, the sets it matches, and its canonical form (None = not given).
const SPEC_VECTORS: &[(&str, &str, Option<&str>)] = &[
    (r#"role == "db""#, "A", Some(r#"role == "db""#)),
    (r#"role != "db""#, "BCDEF", Some(r#"role != "db""#)),
    (
        r#"role in {"db", "web"}"#,
        "AB",
        Some(r#"role in {"db", "web"}"#),
    ),
    (
        r#"role not in {"db"}"#,
        "BCDEF",
        Some(r#"role not in {"db"}"#),
    ),
    ("has(env)", "AB", Some("has(env)")),
    ("!has(env)", "CDEF", Some("!has(env)")),
    ("all()", "ABCDEF", Some("all()")),
    ("", "ABCDEF", Some("all()")),
    ("global()", "ABCDEF", Some("global()")),
    (
        r#"env == "prod" && role == "db""#,
        "A",
        Some(r#"(env == "prod" && role == "db")"#),
    ),
    (
        r#"env == "prod" || role == "web""#,
        "AB",
        Some(r#"(env == "prod" || role == "web")"#),
    ),
    (r#"!(env == "prod")"#, "BCDEF", Some(r#"!env == "prod""#)),
    (r#"!env == "prod""#, "BCDEF", Some(r#"!env == "prod""#)),
    (r#"role contains "e""#, "B", Some(r#"role contains "e""#)),
    (
        r#"role starts with "d""#,
        "A",
        Some(r#"role starts with "d""#),
    ),
    (r#"role ends with "b""#, "AB", Some(r#"role ends with "b""#)),
    (
        r#"a == "x" || b == "y" && c == "q""#,
        "F",
        Some(r#"(a == "x" || (b == "y" && c == "q"))"#),
    ),
    (r#"(a == "x" || b == "y") && c == "q""#, "", None),
    ("role in {}", "", None),
    ("role not in {}", "ABCDEF", None),
    (r#"role in {"db",}"#, "A", Some(r#"role in {"db"}"#)),
    ("tier == 'backend'", "A", Some(r#"tier == "backend""#)),
    (r#"msg == 'say "hi"'"#, "F", Some(r#"msg == 'say "hi"'"#)),
    ("has(node-role.kubernetes.io/control-plane)", "E", None),
    (r#"node-role.kubernetes.io/control-plane == """#, "E", None),
    (r#"kubernetes.io/hostname == "node-1""#, "E", None),
    ("!!has(env)", "AB", Some("has(env)")),
    (
        r#"env notin {"dev"}"#,
        "ACDEF",
        Some(r#"env not in {"dev"}"#),
    ),
    (
        r#"role startswith "d""#,
        "A",
        Some(r#"role starts with "d""#),
    ),
    (r#"projectcalico.org/namespace == "ns1""#, "D", None),
    (r#"pcns.team == "a""#, "D", None),
    ("!has(projectcalico.org/namespace)", "ABCEF", None),
    (
        r#"host-endpoint == "true" && !has(projectcalico.org/namespace)"#,
        "E",
        None,
    ),
    (r#"Role == "db""#, "", None),
];

#[test]
fn spec_vectors_match_and_canonicalise() {
    let sets = spec_sets();
    for (input, want, canonical) in SPEC_VECTORS {
        let sel = parse(input);
        let got: String = sets
            .iter()
            .filter(|(_, l)| sel.matches(l))
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(&got, want, "matches of {input:?}");
        if let Some(c) = canonical {
            assert_eq!(sel.canonical(), *c, "canonical form of {input:?}");
        }
        // The canonical form is a fixed point and means the same.
        let again = parse(&sel.canonical());
        assert_eq!(again, sel, "re-parse of {input:?}");
        for (_, l) in &sets {
            assert_eq!(again.matches(l), sel.matches(l));
        }
    }
}

/// Spec §1.4's rejected selectors and Calico's `badSelectors`.
const REJECTED: &[&str] = &[
    "role == db",
    "has (env)",
    r#"role == "db" & env == "prod""#,
    "role == \"db\"\n",
    r#"env = "prod""#,
    r#"role in ["db"]"#,
    "role in {db}",
    r#"(role == "db""#,
    "has(env) ||",
    r#""x" == role"#,
    "a b",
    // Calico parser_test.go badSelectors:
    "b == b",
    "b contains b",
    "b starts with b",
    "b ends with b",
    "'b1' == b",
    "b",
    "!",
    r#"foo == "bar" &"#,
    r#"foo == "bar" |"#,
    "foo != ||",
    r#"foo in {"", ||"#,
    r#"foo in """#,
    r#""FOO"#,
    r#""FOO'"#,
    "'FOO",
    "(",
    r#"(a == "foo""#,
    ")",
    "()",
    "%",
    r#"a == "b" && %"#,
    r#"a == "b" || %"#,
    "a ",
    "has(foo) &&",
    // More lexical corners.
    "has()",
    "has(a b)",
    "all(x)",
    "global( x )",
    "all ()",
    r#"a inx {"b"}"#,
    r#"a starts "x""#,
    r#"a in {,}"#,
    r#"a in {"x",,}"#,
    r#"a in {"x" "y"}"#,
    r#"a == "x" )"#,
    r#"a === "x""#,
    r#"a ! = "x""#,
    "a == \"x\"\r",
    "\nall()",
    r#"é == "x""#,
    r#"a has(b)"#,
    r#"a == "x" b == "y""#,
];

#[test]
fn rejected_selectors() {
    for input in REJECTED {
        let err = Selector::parse(input).expect_err(input);
        assert_eq!(err.input, *input);
        assert!(err.position <= input.len());
        // Rendering never fails and always shows the caret.
        assert!(err.to_string().contains('^'), "{err}");
    }
}

#[test]
fn accepted_lexical_corners() {
    let cases: &[(&str, &str)] = &[
        ("  \t all()\t ", "all()"),
        ("all( )", "all()"),
        ("global(\t)", "global()"),
        ("has( a )", "has(a)"),
        ("! has(a)", "!has(a)"),
        ("!!! has(a)", "!has(a)"),
        ("! !!has(a)", "!has(a)"),
        ("!(!has(a))", "has(a)"),
        (r#"a!='"'"#, r#"a != '"'"#),
        (r#"a contains"x""#, r#"a contains "x""#),
        (r#"a startswith '"'"#, r#"a starts with '"'"#),
        (r#"a endswith "'""#, r#"a ends with "'""#),
        (r#"a starts   with "x""#, r#"a starts with "x""#),
        (r#"a not  in {"x"}"#, r#"a not in {"x"}"#),
        (r#"a in{"x"}"#, r#"a in {"x"}"#),
        // `not`, `in`, `has`, `all` are ordinary labels where a label is expected.
        (r#"not in {"a"}"#, r#"not in {"a"}"#),
        (r#"in in {"a"}"#, r#"in in {"a"}"#),
        (r#"has == "x""#, r#"has == "x""#),
        (r#"all == "x""#, r#"all == "x""#),
        (r#"contains contains "x""#, r#"contains contains "x""#),
        // Labels may start with any label character.
        (r#"-1./_ == "x""#, r#"-1./_ == "x""#),
        // String literals take anything up to the closing quote, newlines and UTF-8 included.
        ("a == \"x\ny\"", "a == \"x\ny\""),
        (r#"a == "héllo ✓""#, r#"a == "héllo ✓""#),
        (r#"a == '\'"#, r#"a == "\""#),
        // Set items are sorted bytewise and de-duplicated.
        (
            r#"a in {"z", "z", "x", "y", "x", "a"}"#,
            r#"a in {"a", "x", "y", "z"}"#,
        ),
        (r#"a in {"'", '"', "c"}"#, r#"a in {'"', "'", "c"}"#),
        (r#"a in {"B", "a", "_"}"#, r#"a in {"B", "_", "a"}"#),
        // Nesting keeps its grouping in the canonical form.
        (
            "(has(a) && has(b)) && has(c)",
            "((has(a) && has(b)) && has(c))",
        ),
        (
            "has(a) && (has(b) && has(c))",
            "(has(a) && (has(b) && has(c)))",
        ),
        ("((((has(a)))))", "has(a)"),
    ];
    for (input, canonical) in cases {
        assert_eq!(parse(input).canonical(), *canonical, "{input:?}");
    }
}

#[test]
fn label_length_limit() {
    let ok = "a".repeat(MAX_LABEL_LEN);
    parse(&format!("{ok} == \"x\""));
    parse(&format!("has({ok})"));
    let long = "a".repeat(MAX_LABEL_LEN + 1);
    let e = Selector::parse(&format!("{long} == \"x\"")).expect_err("long label");
    assert_eq!(e.position, 0);
    let e = Selector::parse(&format!("has({long})")).expect_err("long has label");
    assert_eq!(e.position, 4);
}

/// Calico's canonicalisationTests (parser_test.go), with the IDs it checks.
#[test]
fn calico_canonical_forms_and_ids() {
    let cases: &[(&str, &str, &str)] = &[
        ("", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        (
            " all() ",
            "all()",
            "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug",
        ),
        (
            " (all() )",
            "all()",
            "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug",
        ),
        (
            "! (has( b)||! has(a ))",
            "!(has(b) || !has(a))",
            "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q",
        ),
        (
            r#"! (a == "b"&&! c != "d")"#,
            r#"!(a == "b" && !c != "d")"#,
            "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w",
        ),
        (
            r#"role == "db""#,
            r#"role == "db""#,
            "s:rV61RKD1Q8wo61pyeB0j2rwE3eiBOFbx0SsYKg",
        ),
        (r#"a == "'""#, r#"a == "'""#, ""),
        (r#"a == '"'"#, r#"a == '"'"#, ""),
        (r#"a contains '"'"#, r#"a contains '"'"#, ""),
        (r#"a contains "'""#, r#"a contains "'""#, ""),
        (r#"a startswith '"'"#, r#"a starts with '"'"#, ""),
        (r#"a endswith "'""#, r#"a ends with "'""#, ""),
        (r#"a!='"'"#, r#"a != '"'"#, ""),
        (r#"a in {"d"}"#, r#"a in {"d"}"#, ""),
        (r#"a in {"d", "a", "b"}"#, r#"a in {"a", "b", "d"}"#, ""),
    ];
    for (input, canonical, id) in cases {
        let sel = parse(input);
        assert_eq!(sel.canonical(), *canonical, "{input:?}");
        assert_eq!(sel.to_string(), *canonical);
        let again = parse(canonical);
        assert_eq!(again.canonical(), *canonical);
        assert_eq!(again.unique_id(), sel.unique_id());
        if !id.is_empty() {
            assert_eq!(sel.unique_id(), *id, "{input:?}");
        }
    }
    // Spec §4.6: the IPv4 set name is the ID truncated to 31 characters.
    let set_name = |s: &str| {
        let mut n = format!("cali40{}", parse(s).unique_id());
        n.truncate(31);
        n
    };
    assert_eq!(
        set_name(r#"role == "db""#),
        "cali40s:rV61RKD1Q8wo61pyeB0j2rw"
    );
    assert_eq!(set_name("all()"), "cali40s:5y5I3VdRZfDU01O--xXAPx2");
}

/// Calico's selectorTests (parser_test.go): selector, label sets it matches, sets it does not.
#[test]
fn calico_evaluation_table() {
    type Set<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&str, &[Set], &[Set])] = &[
        (
            r#"a == "b""#,
            &[&[("a", "b")], &[("a", "b"), ("c", "d")]],
            &[&[], &[("a", "c")], &[("c", "d")]],
        ),
        (
            r#"a == "b" && c == "d""#,
            &[&[("a", "b"), ("c", "d")]],
            &[
                &[],
                &[("a", "b"), ("c", "e")],
                &[("a", "c"), ("c", "d")],
                &[("c", "d")],
                &[("a", "b")],
            ],
        ),
        (
            r#"a == "b" || c == "d""#,
            &[&[("a", "b"), ("c", "d")], &[("a", "b")], &[("c", "d")]],
            &[&[], &[("a", "e"), ("c", "e")], &[("c", "e")], &[("a", "e")]],
        ),
        (
            r#"a in {"'", '"', "c"}"#,
            &[&[("a", "c")], &[("a", "\"")], &[("a", "'")]],
            &[&[], &[("a", "e")]],
        ),
        (
            r#"a not in {"'", '"', "c"}"#,
            &[&[], &[("a", "e")]],
            &[&[("a", "c")], &[("a", "\"")], &[("a", "'")]],
        ),
        (r#"a != "a""#, &[&[]], &[&[("a", "a")]]),
        (
            r#"a contains "a""#,
            &[&[("a", "a")], &[("a", "bab")]],
            &[&[], &[("a", "b")], &[("b", "aaa")]],
        ),
        (
            r#"a starts with "a""#,
            &[&[("a", "abb")]],
            &[&[], &[("a", "baa")], &[("b", "aaa")]],
        ),
        (
            r#"a ends with "a""#,
            &[&[("a", "bba")]],
            &[&[], &[("a", "aab")], &[("b", "aaa")]],
        ),
        (r#"!a in {"a"}"#, &[&[("a", "b")], &[]], &[&[("a", "a")]]),
        ("has(a)", &[&[("a", "b")], &[("a", "")]], &[&[("b", "b")]]),
        ("!has(a)", &[&[("b", "b")]], &[&[("a", "")]]),
        (" ", &[&[], &[("a", "b")]], &[]),
        ("!! ! has(a)", &[&[]], &[&[("a", "b")]]),
        (
            "has(a) && !has(b)",
            &[&[("a", "a")]],
            &[&[("a", "a"), ("b", "b")]],
        ),
        (
            "!(!has(a) || has(b))",
            &[&[("a", "a")]],
            &[&[("b", "b")], &[]],
        ),
        (
            "a != 'a1' && !b == 'b1'",
            &[&[]],
            &[&[("a", "a1"), ("b", "b1")]],
        ),
        (
            "a == 'a1' || b != 'b1'",
            &[&[("a", "a1"), ("b", "b1")]],
            &[&[("a", "a2"), ("b", "b1")]],
        ),
        (
            "! a == 'a1' || ! b == 'b1'",
            &[&[]],
            &[&[("a", "a1"), ("b", "b1")]],
        ),
    ];
    for (input, yes, no) in cases {
        let sel = parse(input);
        let again = parse(&sel.canonical());
        for l in yes.iter() {
            assert!(sel.matches(&labels(l)), "{input:?} should match {l:?}");
            assert!(again.matches(&labels(l)));
        }
        for l in no.iter() {
            assert!(!sel.matches(&labels(l)), "{input:?} should not match {l:?}");
            assert!(!again.matches(&labels(l)));
        }
    }
}

#[test]
fn global_depends_on_scope() {
    let sel = parse("global()");
    let none = labels(&[]);
    assert!(sel.matches(&none));
    assert!(sel.matches_in(&none, Scope::Any));
    assert!(sel.matches_in(&none, Scope::Global));
    assert!(!sel.matches_in(&none, Scope::Namespaced));
    let not_global = parse("!global()");
    assert!(!not_global.matches(&none));
    assert!(not_global.matches_in(&none, Scope::Namespaced));
    // all() does not care.
    assert!(parse("all()").matches_in(&none, Scope::Namespaced));
    assert!(sel.uses_global());
    assert!(parse("has(a) || !global()").uses_global());
    assert!(!parse("has(a)").uses_global());
}

#[test]
fn evaluates_hash_maps_too() {
    let m: HashMap<String, String> = [("a".to_string(), "b".to_string())].into();
    assert!(parse("a == 'b'").matches(&m));
    assert!(!parse("a != 'b'").matches(&m));
}

/// (input, byte position, column, expected, found)
const ERROR_POSITIONS: &[(&str, usize, usize, &str, &str)] = &[
    (
        "role == 'db' &&",
        15,
        16,
        "a label expression",
        "end of input",
    ),
    ("role == db", 8, 9, "a quoted string", "label `db`"),
    ("has (env)", 4, 5, "an operator", "`(`"),
    (
        r#"role == "db" & env == "prod""#,
        13,
        14,
        "`&&`",
        "a lone `&`",
    ),
    (
        "role == \"db\"\n",
        12,
        13,
        "`&&`, `||` or end of input",
        "a newline",
    ),
    (r#"env = "prod""#, 4, 5, "`==`", "a lone `=`"),
    (r#"role in ["db"]"#, 8, 9, "`{` starting a set", "`[`"),
    (
        "role in {db}",
        9,
        10,
        "a quoted string or `}`",
        "label `db`",
    ),
    (
        r#"(role == "db""#,
        13,
        14,
        "`&&`, `||` or `)`",
        "end of input",
    ),
    ("has(env) ||", 11, 12, "a label expression", "end of input"),
    (r#""x" == role"#, 0, 1, "a label expression", "string `x`"),
    ("a b", 2, 3, "an operator", "`b`"),
    (r#"a == "b"#, 5, 6, "a closing `\"`", "end of input"),
    ("has()", 4, 5, "a label name inside `has(...)`", "`)`"),
    ("has(a b)", 6, 7, "`)` to close `has(`", "`b`"),
    ("all(x)", 4, 5, "`)` after `all(`", "`x`"),
    (r#"a in {"x",,}"#, 10, 11, "a quoted string or `}`", "`,`"),
    (r#"a in {"x" "y"}"#, 10, 11, "`,` or `}`", "string `y`"),
    (r#"a == "x" )"#, 9, 10, "`&&`, `||` or end of input", "`)`"),
    (r#"é == "x""#, 0, 1, "a label expression", "`é`"),
    // Byte offset and column differ after non-ASCII text.
    (r#"a == "é" && ü"#, 13, 13, "a label expression", "`ü`"),
    (r#"a starts "x""#, 2, 3, "an operator", "`starts`"),
    ("!", 1, 2, "a label expression", "end of input"),
    ("()", 1, 2, "a label expression", "`)`"),
    ("a", 1, 2, "an operator", "end of input"),
    (r#"a == "x" || %"#, 12, 13, "a label expression", "`%`"),
    (r#"a in "x""#, 5, 6, "`{` starting a set", "string `x`"),
    ("a\tb", 2, 3, "an operator", "`b`"),
];

#[test]
fn error_positions() {
    for (input, pos, col, expected, found) in ERROR_POSITIONS {
        let e = Selector::parse(input).expect_err(input);
        assert_eq!(
            (e.position, e.column),
            (*pos, *col),
            "position for {input:?}: {e}"
        );
        assert!(
            e.expected.starts_with(expected),
            "expected for {input:?}: {:?}",
            e.expected
        );
        assert_eq!(e.found, *found, "found for {input:?}");
    }
}

#[test]
fn error_display_shows_caret() {
    let e = Selector::parse("role == 'db' &&").expect_err("incomplete");
    assert_eq!(
        e.to_string(),
        "selector \"role == 'db' &&\": expected a label expression at column 16, found end \
         of input\n  role == 'db' &&\n                 ^"
    );
    // Tabs are copied into the caret line; the newline is made visible.
    let e = Selector::parse("a ==\t\"x\"\n").expect_err("newline");
    assert_eq!(e.to_string().lines().nth(1), Some("  a ==\t\"x\"␤"));
    assert_eq!(e.to_string().lines().nth(2), Some("      \t   ^"));
    // Long input is windowed around the error.
    let long = format!("{} && %", vec!["has(a)"; 40].join(" && "));
    let e = Selector::parse(&long).expect_err("bad char");
    let shown = e.to_string();
    let mut lines = shown.lines().skip(1);
    let (line, caret) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    assert!(line.starts_with("  …"), "{line}");
    let caret_col = caret.chars().count() - 1;
    assert_eq!(line.chars().nth(caret_col), Some('%'), "{shown}");
}

#[test]
fn nesting_limit() {
    let nested = |n: usize| format!("{}has(a){}", "(".repeat(n), ")".repeat(n));
    assert_eq!(parse(&nested(MAX_DEPTH)).canonical(), "has(a)");
    let e = Selector::parse(&nested(MAX_DEPTH + 1)).expect_err("too deep");
    assert_eq!(e.position, MAX_DEPTH);
    // Hostile input returns an error instead of overflowing the stack.
    assert!(Selector::parse(&"(".repeat(100_000)).is_err());
    assert!(Selector::parse(&"!(".repeat(100_000)).is_err());
    assert!(parse(&format!("{}has(a)", "!".repeat(100_001))).canonical() == "!has(a)");
}

#[test]
fn label_keys_lists_every_label_once() {
    let sel = parse(
        r#"a == "x" && (b in {"y"} || !has(c)) && a != "z" || d contains "q" || all() || global()"#,
    );
    assert_eq!(
        sel.label_keys().into_iter().collect::<Vec<_>>(),
        vec!["a", "b", "c", "d"]
    );
    assert!(parse("all()").label_keys().is_empty());
}

#[test]
fn serde_round_trip() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Rule {
        selector: Selector,
        #[serde(default)]
        not_selector: Selector,
    }
    let rule: Rule =
        serde_json::from_str(r#"{"selector": "role == 'db'"}"#).expect("valid selector");
    assert_eq!(rule.selector, parse(r#"role == "db""#));
    assert_eq!(rule.not_selector, Selector::all());
    let json = serde_json::to_string(&rule).expect("serialise");
    assert_eq!(
        json,
        r#"{"selector":"role == \"db\"","not_selector":"all()"}"#
    );
    assert_eq!(
        serde_json::from_str::<Rule>(&json).expect("round trip"),
        rule
    );

    let err = serde_json::from_str::<Rule>(r#"{"selector": "role == db"}"#)
        .expect_err("invalid selector");
    assert!(
        err.to_string().contains("expected a quoted string"),
        "{err}"
    );
    assert!(serde_json::from_str::<Rule>(r#"{"selector": 5}"#).is_err());
}

#[test]
fn conversions() {
    let a: Selector = "has(a)".parse().expect("parse");
    let b = Selector::try_from("has(a)").expect("try_from &str");
    let c = Selector::try_from("has(a)".to_string()).expect("try_from String");
    assert_eq!(a, b);
    assert_eq!(b, c);
    assert_eq!(String::from(a), "has(a)");
    assert!(Selector::try_from("has(").is_err());
}

/// Calico's PrefixVisitor tests, plus the namespace rewrites of spec §1.3.
#[test]
fn prefix_and_replace() {
    let cases: &[(&str, &str)] = &[
        ("k == 'v'", r#"visited/k == "v""#),
        ("k != 'v'", r#"visited/k != "v""#),
        ("k contains 'v'", r#"visited/k contains "v""#),
        ("k starts with 'v'", r#"visited/k starts with "v""#),
        ("k ends with 'v'", r#"visited/k ends with "v""#),
        (
            "k == 'v' && x == 'y'",
            r#"(visited/k == "v" && visited/x == "y")"#,
        ),
        (
            "k == 'v' || has(x)",
            r#"(visited/k == "v" || has(visited/x))"#,
        ),
        ("!(k == 'v')", r#"!visited/k == "v""#),
        ("k in {'v'}", r#"visited/k in {"v"}"#),
        ("k not in {'v'}", r#"visited/k not in {"v"}"#),
        (
            "!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
            r#"!(!((visited/k == "v" && has(visited/t)) || all()) && visited/a in {"b", "c"})"#,
        ),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse(input).with_label_prefix("visited/").canonical(),
            *want,
            "{input:?}"
        );
    }

    let has_ns = Expr::Has("projectcalico.org/namespace".to_string());
    let sel = parse("team == 'a' || all()")
        .with_label_prefix("pcns.")
        .replace_all(&has_ns);
    assert_eq!(
        sel.canonical(),
        r#"(pcns.team == "a" || has(projectcalico.org/namespace))"#
    );
    // global() becomes !has(...); under a `!` the double negation cancels.
    let not_has_ns = !has_ns.clone();
    let sel = parse("global()").replace_global(&not_has_ns);
    assert_eq!(sel.canonical(), "!has(projectcalico.org/namespace)");
    let sel = parse("!global() && has(a)").replace_global(&not_has_ns);
    assert_eq!(
        sel.canonical(),
        "(has(projectcalico.org/namespace) && has(a))"
    );
    assert_eq!(parse(&sel.canonical()), sel);
}

// ---- property tests ----

/// Fragments that make up most selectors, good and bad, so random strings hit the grammar.
const ALPHABET: &[&str] = &[
    "a",
    "b",
    "role",
    "x.y/z-1",
    "not",
    "in",
    "has",
    "all",
    " ",
    " ",
    " ",
    "\t",
    "==",
    "!=",
    "!",
    "&&",
    "||",
    "(",
    ")",
    "{",
    "}",
    ",",
    "'v'",
    "\"w\"",
    "'\"'",
    "\"'\"",
    "\"\"",
    " in ",
    " not in ",
    "notin",
    " contains ",
    " starts with ",
    "startswith",
    " ends with ",
    "has(a)",
    "has(b)",
    "has(",
    "all()",
    "global()",
    "=",
    "&",
    "|",
    "\n",
    "é",
    "'",
    "\"",
    "with",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), 0..24).prop_map(|v| v.concat())
}

/// Label sets over the labels and values the alphabet and the AST strategy use.
fn probe_sets() -> Vec<BTreeMap<String, String>> {
    let values = ["v", "w", "\"", "'", "", "x"];
    let mut sets = vec![labels(&[])];
    for (i, v) in values.iter().enumerate() {
        let w = values[(i + 1) % values.len()];
        sets.push(labels(&[("a", v), ("role", w)]));
        sets.push(labels(&[("b", v), ("x.y/z-1", w), ("not", v), ("in", w)]));
        sets.push(labels(&[("a", v), ("b", w), ("has", v), ("all", v)]));
    }
    sets
}

/// Whatever parses must print a canonical form that parses back to the same tree, prints the
/// same again, and evaluates the same.
fn check_round_trip(input: &str) -> Result<(), TestCaseError> {
    let Ok(sel) = Selector::parse(input) else {
        return Ok(());
    };
    let canonical = sel.canonical();
    let again = Selector::parse(&canonical)
        .map_err(|e| TestCaseError::fail(format!("canonical of {input:?} fails:\n{e}")))?;
    prop_assert_eq!(&again, &sel, "{:?} -> {:?}", input, canonical);
    prop_assert_eq!(again.canonical(), canonical.clone());
    prop_assert_eq!(again.unique_id(), sel.unique_id());
    for l in probe_sets() {
        for scope in [Scope::Any, Scope::Global, Scope::Namespaced] {
            prop_assert_eq!(again.matches_in(&l, scope), sel.matches_in(&l, scope));
        }
    }
    Ok(())
}

fn label_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "role", "x.y/z-1", "not", "in", "has", "all"])
            .prop_map(String::from),
        "[A-Za-z0-9_./-]{1,12}",
    ]
}

fn value_strategy() -> impl Strategy<Value = String> {
    // Any text without both quote characters (those cannot be written as a literal).
    prop_oneof!["[^\"]{0,6}", "[^']{0,6}", "[vw\"' ]{0,3}"]
        .prop_filter("both quote characters", |v| {
            !(v.contains('"') && v.contains('\''))
        })
}

fn expr_strategy() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        Just(Expr::All),
        Just(Expr::Global),
        label_strategy().prop_map(Expr::Has),
        (label_strategy(), value_strategy()).prop_map(|(l, v)| Expr::Eq(l, v)),
        (label_strategy(), value_strategy()).prop_map(|(l, v)| Expr::Ne(l, v)),
        (label_strategy(), value_strategy()).prop_map(|(l, v)| Expr::Contains(l, v)),
        (label_strategy(), value_strategy()).prop_map(|(l, v)| Expr::StartsWith(l, v)),
        (label_strategy(), value_strategy()).prop_map(|(l, v)| Expr::EndsWith(l, v)),
        (
            label_strategy(),
            prop::collection::btree_set(value_strategy(), 0..4)
        )
            .prop_map(|(l, s)| Expr::In(l, s)),
        (
            label_strategy(),
            prop::collection::btree_set(value_strategy(), 0..4)
        )
            .prop_map(|(l, s)| Expr::NotIn(l, s)),
    ];
    leaf.prop_recursive(5, 40, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| !e),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
        ]
    })
}

/// Writes `e` in a random but equivalent surface syntax: either quote where allowed, random
/// spaces and tabs, `!!`, redundant parentheses, `notin`/`startswith`, trailing commas and
/// repeated set items. Choices come from `dice`, cycled.
struct Noisy<'a> {
    dice: &'a [u8],
    i: usize,
    out: String,
}

impl Noisy<'_> {
    fn roll(&mut self, n: u8) -> u8 {
        let d = self
            .dice
            .get(self.i % self.dice.len().max(1))
            .copied()
            .unwrap_or(0);
        self.i += 1;
        d % n
    }
    fn space(&mut self) {
        match self.roll(6) {
            0 => self.out.push(' '),
            1 => self.out.push('\t'),
            2 => self.out.push_str("  "),
            _ => {}
        }
    }
    fn need_space(&mut self) {
        let c = if self.roll(4) == 0 { '\t' } else { ' ' };
        self.out.push(c);
        self.space();
    }
    fn pick<'s>(&mut self, options: &[&'s str]) -> &'s str {
        options[usize::from(self.roll(options.len() as u8))]
    }
    fn quoted(&mut self, v: &str) {
        let q = if v.contains('"') {
            '\''
        } else if v.contains('\'') || self.roll(2) == 0 {
            '"'
        } else {
            '\''
        };
        self.out.push(q);
        self.out.push_str(v);
        self.out.push(q);
    }
    fn binop(&mut self, l: &str, ops: &[&str], v: &str) {
        self.out.push_str(l);
        let op = self.pick(ops);
        // Word operators need a space after the label; symbols do not.
        if op.starts_with(|c: char| c.is_ascii_alphabetic()) {
            self.need_space();
        } else {
            self.space();
        }
        self.out.push_str(op);
        self.space();
        self.quoted(v);
    }
    fn set(&mut self, l: &str, ops: &[&str], set: &BTreeSet<String>) {
        self.out.push_str(l);
        self.need_space();
        let op = self.pick(ops);
        self.out.push_str(op);
        self.space();
        self.out.push('{');
        let mut items: Vec<&String> = set.iter().collect();
        if let Some(first) = set.iter().next()
            && self.roll(3) == 0
        {
            items.push(first);
        }
        if self.roll(2) == 0 {
            items.reverse();
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.space();
            self.quoted(item);
        }
        if !items.is_empty() && self.roll(3) == 0 {
            self.out.push(',');
        }
        self.space();
        self.out.push('}');
    }
    fn expr(&mut self, e: &Expr) {
        self.space();
        if self.roll(8) == 0 {
            self.out.push_str("!!");
            self.space();
        }
        let wrap = self.roll(6) == 0;
        if wrap {
            self.out.push('(');
            self.space();
        }
        match e {
            Expr::All => {
                let text = self.pick(&["all()", "all( )"]);
                self.out.push_str(text);
            }
            Expr::Global => self.out.push_str("global()"),
            Expr::Has(l) => {
                self.out.push_str("has(");
                self.space();
                self.out.push_str(l);
                self.space();
                self.out.push(')');
            }
            Expr::Eq(l, v) => self.binop(l, &["=="], v),
            Expr::Ne(l, v) => self.binop(l, &["!="], v),
            Expr::Contains(l, v) => self.binop(l, &["contains"], v),
            Expr::StartsWith(l, v) => {
                self.binop(l, &["starts with", "startswith", "starts \twith"], v)
            }
            Expr::EndsWith(l, v) => self.binop(l, &["ends with", "endswith"], v),
            Expr::In(l, set) => self.set(l, &["in"], set),
            Expr::NotIn(l, set) => self.set(l, &["not in", "notin", "not\tin"], set),
            Expr::Not(inner) => {
                self.out.push('!');
                self.space();
                // `!` binds to one operation, so a compound operand needs its parentheses.
                let compound = matches!(**inner, Expr::And(_) | Expr::Or(_));
                self.group(inner, compound);
            }
            Expr::And(es) => self.joined(es, "&&"),
            Expr::Or(es) => self.joined(es, "||"),
        }
        if wrap {
            self.space();
            self.out.push(')');
        }
        self.space();
    }
    fn group(&mut self, e: &Expr, parens: bool) {
        if parens {
            self.out.push('(');
        }
        self.expr(e);
        if parens {
            self.out.push(')');
        }
    }
    fn joined(&mut self, es: &[Expr], op: &str) {
        for (i, e) in es.iter().enumerate() {
            if i > 0 {
                self.out.push_str(op);
            }
            // Nested And/Or operands need parentheses to stay separate nodes.
            let parens = matches!(e, Expr::And(_) | Expr::Or(_));
            self.group(e, parens);
        }
    }
}

fn noisy(e: &Expr, dice: &[u8]) -> String {
    let mut n = Noisy {
        dice,
        i: 0,
        out: String::new(),
    };
    n.expr(e);
    n.out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        if let Err(e) = Selector::parse(&s) {
            prop_assert!(e.position <= s.len());
            prop_assert!(s.is_char_boundary(e.position));
            let _ = e.to_string();
        }
        check_round_trip(&s)?;
    }

    #[test]
    fn token_soup_round_trips(s in token_soup()) {
        if let Err(e) = Selector::parse(&s) {
            prop_assert!(s.is_char_boundary(e.position));
            let _ = e.to_string();
        }
        check_round_trip(&s)?;
    }

    #[test]
    fn generated_trees_round_trip(e in expr_strategy()) {
        let sel = Selector::from_expr(e);
        let canonical = sel.canonical();
        let again = Selector::parse(&canonical)
            .map_err(|err| TestCaseError::fail(format!("{canonical:?} fails:\n{err}")))?;
        prop_assert_eq!(&again, &sel);
        check_round_trip(&canonical)?;
    }

    #[test]
    fn noisy_surface_syntax_parses_to_the_same_tree(
        e in expr_strategy(),
        dice in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let text = noisy(&e, &dice);
        let sel = Selector::parse(&text)
            .map_err(|err| TestCaseError::fail(format!("{text:?} fails:\n{err}")))?;
        prop_assert_eq!(sel.expr(), &e, "{:?}", text);
        check_round_trip(&text)?;
    }
}
