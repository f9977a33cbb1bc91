//! The checkpoint parser over arbitrary bytes: the input is split into `config.json`, an
//! optional `model.safetensors.index.json` and up to two safetensors files (each part prefixed
//! by its length, two bytes little endian), then run through
//! `moe_ep::testing::checkpoint_fuzz::exercise`, which panics only on an inconsistent result.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    while data.len() >= 2 && v.len() < 4 {
        let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
        v.push(&data[2..2 + n]);
        data = &data[2 + n..];
    }
    v.push(data);
    v
}

fuzz_target!(|data: &[u8]| {
    let p = parts(data);
    let config = p[0];
    let (index, files) = match p.len() {
        1 | 2 => (None, vec![("model.safetensors".to_string(), p.get(1).copied().unwrap_or(&[]).to_vec())]),
        _ => (
            Some(p[1]),
            p[2..]
                .iter()
                .enumerate()
                .map(|(i, f)| (format!("model-{:05}-of-00002.safetensors", i + 1), f.to_vec()))
                .collect(),
        ),
    };
    moe_ep::testing::checkpoint_fuzz::exercise(config, index, files, 3, 2);
});
