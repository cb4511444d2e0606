use super::*;

fn parse(text: &str) -> Result<Pipeline, ConfigErrors> {
    // plugin paths are checked against the file system: point them at this source file
    let text = text.replace("PLUGIN", concat!(env!("CARGO_MANIFEST_DIR"), "/src/config/tests.rs"));
    Pipeline::parse(Path::new("pipeline.toml"), &text)
}

fn errors(text: &str) -> Vec<Diagnostic> {
    parse(text).expect_err("expected errors").0
}

const GOOD: &str = r#"
[pipeline]
name = "orders"

[secrets]
k = { env = "SOME_KEY" }

[sources.raw]
format = "csv"
path = "data/*.csv"
schema = { id = "int64", email = "string" }

[plugins.mask]
path = "PLUGIN"
secrets = ["k"]

[steps.stg]
input = "raw"
output = { path = "out/stg", partition_by = "day" }

[[steps.stg.transforms]]
plugin = "mask"
config = { columns = { email = { method = "hmac", secret = "k" } } }

[steps.mart]
input = "stg"
output = { path = "out/mart" }
"#;

#[test]
fn good_pipeline_parses_in_dependency_order() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.name, "orders");
    let names: Vec<_> = p.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["stg", "mart"]);
    assert_eq!(p.steps[1].transforms.len(), 0);
    assert!(p.steps[0].transforms[0].config_json.contains("\"secret\":\"k\""));
    assert_eq!(p.sources["raw"].schema.len(), 2);
    assert_eq!(p.batch_size, DEFAULT_BATCH_SIZE);
    assert_eq!(p.plugins["mask"].memory_bytes, 256 << 20);
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = GOOD.replace("[steps.mart]\ninput = \"stg\"", "[steps.mart]\ninptu = \"stg\"");
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert!(e[0].message.contains("unknown field `inptu`"), "{}", e[0]);
    assert_eq!(e[0].line, 26, "{}", e[0]);
    assert!(e[0].to_string().starts_with("pipeline.toml:26:1:"), "{}", e[0]);
}

#[test]
fn wrong_type_names_line() {
    let text = GOOD.replace("name = \"orders\"", "name = \"orders\"\nbatch_size = \"big\"");
    let e = errors(&text);
    assert!(e[0].message.contains("invalid type"), "{}", e[0]);
    assert_eq!(e[0].line, 4, "{}", e[0]);
}

#[test]
fn missing_plugin_file_and_unknown_plugin_and_unknown_input() {
    let text = GOOD
        .replace("path = \"PLUGIN\"", "path = \"nope/mask.wasm\"")
        .replace("plugin = \"mask\"", "plugin = \"masc\"")
        .replace("input = \"stg\"", "input = \"stgg\"");
    let e = errors(&text);
    let text_of = |needle: &str| {
        e.iter().find(|d| d.message.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in {e:?}"))
    };
    assert_eq!(text_of("does not exist").line, 14);
    let d = text_of("`masc`");
    assert_eq!(d.line, 22);
    assert!(d.hint.as_deref().unwrap().contains("mask"));
    assert_eq!(text_of("`stgg`").line, 26);
}

#[test]
fn digest_mismatch_names_the_pin_line() {
    let text = GOOD.replace("path = \"PLUGIN\"", "path = \"PLUGIN\"\nsha256 = \"00ff\"");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("sha256 pin does not match"), "{}", e[0]);
    assert_eq!(e[0].line, 15);
}

#[test]
fn cycles_and_bad_secrets_are_reported() {
    let text = GOOD.replace("input = \"raw\"", "input = \"mart\"").replace("k = { env = \"SOME_KEY\" }", "k = { }");
    let e = errors(&text);
    assert!(e.iter().any(|d| d.message.contains("cycle") && d.message.contains("stg")), "{e:?}");
    assert!(e.iter().any(|d| d.message.contains("exactly one of `env` or `file`") && d.line == 6), "{e:?}");
}

#[test]
fn unknown_type_in_schema() {
    let e = errors(&GOOD.replace("id = \"int64\"", "id = \"int65\""));
    assert!(e[0].message.contains("int65") && e[0].line == 11, "{:?}", e[0]);
    assert!(e[0].hint.as_deref().unwrap().contains("int64"));
}

#[test]
fn secrets_resolve_from_env_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("key");
    std::fs::write(&f, "s3cret\n").unwrap();
    assert_eq!(SecretRef::File(f).resolve().unwrap(), b"s3cret");
    assert!(SecretRef::Env("WEIR_TEST_SURELY_UNSET".into()).resolve().unwrap_err().contains("WEIR_TEST_SURELY_UNSET"));
}

#[test]
fn output_compression_defaults_to_zstd_1_and_bad_values_name_the_line() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.steps[0].output.as_ref().unwrap().compression, Codec::Zstd(1));
    let text =
        GOOD.replace("output = { path = \"out/mart\" }", "output = { path = \"out/mart\", compression = \"ZSTD(9)\" }");
    assert_eq!(parse(&text).unwrap().steps[1].output.as_ref().unwrap().compression, Codec::Zstd(9));
    for (value, codec) in [("snappy", Codec::Snappy), ("none", Codec::None), ("zstd", Codec::Zstd(1))] {
        assert_eq!(Codec::parse(value), Ok(codec));
    }
    // written out (as weir-bench writes its pipelines), every codec reads back as itself
    for codec in [Codec::Zstd(1), Codec::Zstd(22), Codec::Snappy, Codec::None] {
        assert_eq!(Codec::parse(&codec.to_string()), Ok(codec));
    }
    for bad in ["zstd(0)", "zstd(23)", "gzip", "zstd(x)", "zstd("] {
        let text = GOOD.replace(
            "output = { path = \"out/mart\" }",
            &format!("output = {{ path = \"out/mart\", compression = \"{bad}\" }}"),
        );
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.contains(bad) && e[0].message.contains("zstd(N)"), "{}", e[0]);
        assert_eq!((e[0].line, e[0].column), (27, 45), "{}", e[0]);
    }
}

#[test]
fn a_check_table_takes_only_its_own_kinds_keys() {
    let text = format!(
        "{GOOD}\n[[steps.mart.checks]]\ncheck = \"not_null\"\ncolumn = \"id\"\npattern = \"^x\"\n\n[[steps.mart.checks]]\ncheck = \"unique\"\ncolumn = \"id\"\nmin = 3\n"
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].message.contains("`pattern` does not belong on a `not_null` check"), "{}", e[0]);
    assert_eq!(e[0].hint.as_deref(), Some("a `not_null` check takes column, severity, tolerance, name"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[e[0].line - 1], "pattern = \"^x\"", "the key's own line: {}", e[0]);
    assert_eq!(e[0].column, 1);
    assert!(e[1].message.contains("`min` does not belong on a `unique` check"), "{}", e[1]);
    assert_eq!(lines[e[1].line - 1], "min = 3", "{}", e[1]);
    // the keys a kind takes are fine, inline tables too
    let ok = format!(
        "{GOOD}\n[[steps.mart.checks]]\ncheck = \"regex\"\ncolumn = \"email\"\npattern = \"column\"\nseverity = \"warn\"\n"
    );
    parse(&ok).unwrap();
}

#[test]
fn plugin_limits_have_defaults_and_bounds() {
    let p = parse(GOOD).unwrap();
    let limits = p.plugins["mask"].limits();
    assert_eq!((limits.output_rows, limits.output_bytes, limits.log_bytes), (100_000_000, 1 << 30, 1 << 20));
    let text = GOOD.replace("secrets = [\"k\"]", "secrets = [\"k\"]\nmax_output_rows = 0\nmax_log_kb = 16");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("plugins.mask.max_output_rows must be between 1 and 4294967295"), "{}", e[0]);
    let text = GOOD.replace("secrets = [\"k\"]", "secrets = [\"k\"]\nmax_log_kb = 16");
    assert_eq!(parse(&text).unwrap().plugins["mask"].limits().log_bytes, 16 << 10);
}

#[test]
fn nested_column_types_parse_and_hostile_ones_are_refused() {
    use arrow_schema::{DataType, Field, Fields};
    let t = column_type("struct<lat: float64, tags: list<string>, at: timestamp_tz(Europe/Paris)>").unwrap();
    let want = DataType::Struct(Fields::from(vec![
        Field::new("lat", DataType::Float64, true),
        Field::new("tags", DataType::List(std::sync::Arc::new(Field::new("item", DataType::Utf8, true))), true),
        Field::new("at", DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("Europe/Paris".into())), true),
    ]));
    assert_eq!(t, want);
    assert!(column_type("List< INT64 >").unwrap().is_nested());
    for (bad, says) in [
        ("struct<a int64>", "is not NAME: TYPE"),
        ("struct<>", "has no fields"),
        ("struct<a: int64, a: string>", "distinct"),
        ("list<nope>", "unknown type `nope`"),
        ("list<int64", "unknown type `list<int64`"),
    ] {
        let e = column_type(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    // a type nested 100,000 deep is refused, not a stack overflow
    let deep = "list<".repeat(100_000) + "int64" + &">".repeat(100_000);
    assert!(column_type(&deep).unwrap_err().contains("at most 32 levels"));
    // struct and list columns are for JSON lines only
    let e = errors(
        "[pipeline]\nname = \"p\"\n[sources.s]\nformat = \"csv\"\npath = \"in.csv\"\nschema = { a = \"list<int64>\" }\n[steps.x]\ninput = \"s\"\noutput = { path = \"out\" }\n",
    );
    assert!(e.iter().any(|d| d.message.contains("read from JSON lines only")), "{e:?}");
}

#[test]
fn lineage_says_where_events_go_or_names_the_line() {
    let p =
        parse(&format!("{GOOD}\n[lineage]\nurl = \"http://127.0.0.1:5000/api/v1/lineage\"\nretries = 50\n")).unwrap();
    let l = p.lineage.unwrap();
    assert_eq!(l.transport, crate::lineage::Transport::Http("http://127.0.0.1:5000/api/v1/lineage".into()));
    assert_eq!((l.namespace.as_str(), l.retries), ("weir", 10), "retries are capped");
    let p = parse(&format!("{GOOD}\n[lineage]\nurl = \"file://ol.jsonl\"\nnamespace = \"prod\"\n")).unwrap();
    assert_eq!(p.lineage.unwrap().transport, crate::lineage::Transport::File("./ol.jsonl".into()));
    let e = errors(&format!("{GOOD}\n[lineage]\nurl = \"https://x\"\n"));
    assert_eq!(e.len(), 1);
    assert!(e[0].message.contains("lineage.url") && e[0].message.contains("no TLS"), "{}", e[0]);
    assert_eq!(e[0].line, GOOD.lines().count() + 3, "{}", e[0]);
    assert!(parse(GOOD).unwrap().lineage.is_none());
}

#[test]
fn metrics_push_to_an_http_pushgateway_or_name_the_line() {
    let p = parse(&format!("{GOOD}\n[metrics]\npushgateway = \"http://127.0.0.1:9091\"\n")).unwrap();
    assert_eq!(p.metrics.unwrap().pushgateway, "http://127.0.0.1:9091");
    let e = errors(&format!("{GOOD}\n[metrics]\npushgateway = \"127.0.0.1:9091\"\n"));
    assert_eq!(e.len(), 1);
    assert!(e[0].message.contains("metrics.pushgateway"), "{}", e[0]);
    assert_eq!(e[0].line, GOOD.lines().count() + 3, "{}", e[0]);
}

#[test]
fn postgres_sources_name_a_secret_url_and_one_table_or_query() {
    let pg = |source: &str| {
        format!(
            "[pipeline]\nname = \"p\"\n\n[sources.db]\n{source}\n\n[steps.s]\ninput = \"db\"\noutput = {{ path = \"out/s\" }}\n"
        )
    };
    let ok = parse(&pg("format = \"postgres\"\nurl = { env = \"PG_URL\" }\ntable = \"public.orders\"\nwhere = \"updated_at >= $start and updated_at < $end\"")).unwrap();
    let p = ok.sources["db"].postgres.as_ref().unwrap();
    assert_eq!(p.sql, "SELECT * FROM \"public\".\"orders\" WHERE updated_at >= $1 and updated_at < $2");
    assert!(p.window);
    assert_eq!(p.url, SecretRef::Env("PG_URL".into()));
    let lit = parse(&pg("format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t\"\nwhere = \"note <> '$start' and ts >= $start and ts < $end\"")).unwrap();
    assert_eq!(
        lit.sources["db"].postgres.as_ref().unwrap().sql,
        "SELECT * FROM \"t\" WHERE note <> '$start' and ts >= $1 and ts < $2",
        "a literal keeps its text"
    );
    let end = parse(&pg("format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t\"\nwhere = \"ts < $end\"")).unwrap();
    let end = end.sources["db"].postgres.as_ref().unwrap();
    assert_eq!((end.sql.as_str(), end.binds.as_slice()), ("SELECT * FROM \"t\" WHERE ts < $1", &["end"][..]));
    let q = parse(&pg("format = \"postgres\"\nurl = { file = \"pg.url\" }\nquery = \"select 1 as x;\"")).unwrap();
    assert_eq!(q.sources["db"].postgres.as_ref().unwrap().sql, "select 1 as x");
    for (source, says) in [
        ("format = \"postgres\"\ntable = \"t\"", "has no `url`"),
        ("format = \"postgres\"\nurl = { env = \"U\" }", "exactly one of `table` or `query`"),
        (
            "format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t\"\nquery = \"select 1\"",
            "exactly one of `table` or `query`",
        ),
        ("format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t; drop table x\"", "not a table name"),
        ("format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t\"\npath = \"x.csv\"", "not files"),
        ("format = \"csv\"\npath = \"x.csv\"\ntable = \"t\"", "applies to postgres sources only"),
        ("format = \"csv\"", "has no `path`"),
        ("format = \"postgres\"\nurl = { env = \"U\" }\ntable = \"t\"\nwhere = \"x > $endpoint\"", "not a parameter"),
    ] {
        let e = errors(&pg(source));
        assert!(e.iter().any(|d| d.message.contains(says)), "{source}: {e:?}");
    }
}

#[test]
fn delta_outputs_on_s3_take_their_storage_and_name_what_is_wrong() {
    let mart = "output = { path = \"out/mart\" }";
    let s3 = GOOD.replace(
        mart,
        r#"output = { format = "delta", path = "s3://lake/tables/mart/", mode = "overwrite_partitions", partition_by = "day",
           storage = { endpoint = "http://127.0.0.1:9000", path_style = true, access_key_id = "k" } }"#,
    );
    let p = parse(&s3).unwrap();
    let out = p.steps[1].output.as_ref().unwrap();
    let r = out.remote.as_ref().unwrap();
    assert_eq!(r.url, "s3://lake/tables/mart/");
    assert_eq!((r.endpoint.as_deref(), r.path_style, r.allow_http), (Some("http://127.0.0.1:9000"), Some(true), None));
    assert_eq!(r.access_key_id, Some(SecretRef::Env("SOME_KEY".into())));
    assert!(out.path.ends_with(".weir/remote/lake/tables/mart"), "{}", out.path.display());
    let folder = parse(&GOOD.replace(mart, r#"output = { path = "s3://lake/folder", mode = "append" }"#)).unwrap();
    let folder = folder.steps[1].output.as_ref().unwrap();
    assert!(folder.remote.is_some() && !folder.folds_published(), "a remote append is the pointer's, not a fold");
    for (text, says) in [
        (r#"output = { format = "delta", path = "s3://lake" }"#, "names a bucket and a prefix"),
        (r#"output = { format = "delta", path = "s3://lake/a/../b" }"#, "names a bucket and a prefix"),
        (r#"output = { path = "s3://lake/t", mode = "merge", key = ["id"] }"#, "on a Parquet folder on object storage"),
        (r#"output = { path = "out/mart", storage = { region = "x" } }"#, "applies to an s3:// path"),
        (
            r#"output = { format = "delta", path = "s3://lake/t", storage = { access_key_id = "nope" } }"#,
            "no secret `nope`",
        ),
        (
            r#"output = { format = "delta", path = "s3://lake/t", storage = { bucket = "x" } }"#,
            "unknown field `bucket`",
        ),
        (r#"output = { path = "out/mart", mode = "overwrite_partitions" }"#, "needs `partition_by`"),
        (r#"output = { path = "out/mart", sequence_by = "id" }"#, "apply to mode = \"merge\" only"),
    ] {
        let e = errors(&GOOD.replace(mart, text));
        assert!(e.iter().any(|d| d.message.contains(says)), "{text}: {e:?}");
    }
}

#[test]
fn debezium_sources_name_their_format() {
    let text = GOOD.replace("format = \"csv\"\npath = \"data/*.csv\"", "format = \"debezium\"\npath = \"cdc/*.json\"");
    let p = parse(&text).unwrap();
    assert_eq!(p.sources["raw"].format, Format::Debezium);
    assert_eq!(Format::Debezium.name(), "debezium");
}

#[test]
fn file_sources_on_s3_are_copied_to_a_local_folder() {
    let text = GOOD.replace(
        "path = \"data/*.csv\"",
        "path = \"s3://lake/raw/*.csv\"\nstorage = { region = \"eu-west-1\", secret_access_key = \"k\" }",
    );
    let p = parse(&text).unwrap();
    let rf = p.sources["raw"].remote.as_ref().unwrap();
    assert_eq!((rf.store.url.as_str(), rf.pattern.as_str()), ("s3://lake/", "raw/*.csv"));
    assert_eq!(rf.store.secret_access_key, Some(SecretRef::Env("SOME_KEY".into())));
    assert!(p.sources["raw"].path.ends_with(".weir/remote-cache/lake/raw/*.csv"), "{}", p.sources["raw"].path);
    for (path, says) in [
        ("s3://lake", "names a bucket and a key"),
        ("data/*.csv\"\nstorage = { region = \"x\" }\n#", "applies to an s3:// path"),
    ] {
        let e = errors(&GOOD.replace("path = \"data/*.csv\"", &format!("path = \"{path}\"")));
        assert!(e.iter().any(|d| d.message.contains(says)), "{path}: {e:?}");
    }
}

#[test]
fn max_record_mb_is_bounded_so_a_batch_of_text_fits_its_offsets() {
    let with = |mb: u64| GOOD.replace("path = \"data/*.csv\"", &format!("path = \"data/*.csv\"\nmax_record_mb = {mb}"));
    assert_eq!(parse(&with(1024)).unwrap().sources["raw"].max_record_mb, 1024);
    let e = errors(&with(1025));
    assert!(e[0].message.contains("sources.raw.max_record_mb must be 1..1024"), "{}", e[0]);
}
