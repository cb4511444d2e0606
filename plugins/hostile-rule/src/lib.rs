//! `hostile-rule`: a quality rule that misbehaves on purpose, for weir's sandbox tests.
//! `mode = "trap"` panics in `check`; `mode = "loop"` spins forever in `check`.

use weir_sdk::prelude::*;
use weir_sdk::rule::{BatchVerdict, QualityRule, Verdict};

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    mode: String,
}

pub struct HostileRule {
    mode: String,
}

impl QualityRule for HostileRule {
    type Config = Config;

    fn new(config: Config, _input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        Ok(HostileRule { mode: config.mode })
    }

    fn check(&mut self, _batch: &RecordBatch) -> Result<BatchVerdict> {
        match self.mode.as_str() {
            "trap" => panic!("hostile rule panics on purpose"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            _ => Ok(BatchVerdict::default()),
        }
    }

    fn finish(&mut self) -> Result<Verdict> {
        Ok(Verdict::from_failures(0))
    }
}

weir_sdk::export_quality_rule!(HostileRule);
