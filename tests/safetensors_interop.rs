//! Holds our hand-written safetensors reader and writer against the reference implementation,
//! the `safetensors` crate: each must read what the other writes, name for name and bit for
//! bit, metadata included.

use std::collections::{BTreeMap, HashMap};

use lego::io::safetensors as ours;
use safetensors as reference;
use safetensors::tensor::{Dtype, TensorView};

/// A few tensors covering the awkward cases: special floats, a scalar, an empty tensor, and
/// names that do not arrive in sorted order.
fn sample() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let specials = vec![
        f32::from_bits(0x7fc0_1234), // NaN with a payload
        -0.0,
        f32::from_bits(1), // smallest subnormal
        f32::INFINITY,
        f32::MAX,
        -1.5,
    ];
    let ramp: Vec<f32> = (0..60).map(|i| (i as f32).sin()).collect();
    vec![
        ("layers.1.w".into(), vec![3, 4, 5], ramp),
        ("layers.0.specials".into(), vec![2, 3], specials),
        ("scalar".into(), vec![], vec![7.25]),
        ("empty".into(), vec![4, 0], vec![]),
    ]
}

fn sample_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("config".to_string(), r#"{"dim": 64, "layers": 2}"#.to_string()),
        ("note".to_string(), "tab\there, quote\" and é".to_string()),
        ("step".to_string(), "1000".to_string()),
    ])
}

fn le_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn our_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)], meta: &BTreeMap<String, String>) -> Vec<u8> {
    let views: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(name, shape, data)| (name.as_str(), shape.as_slice(), data.as_slice()))
        .collect();
    ours::serialize(&views, meta)
}

fn reference_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(name, shape, data)| (name.clone(), shape.clone(), le_bytes(data))).collect();
    let views = raw.iter().map(|(name, shape, bytes)| {
        (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap())
    });
    reference::serialize(views, &meta).unwrap()
}

#[test]
fn reference_reads_what_we_write() {
    let tensors = sample();
    let meta = sample_metadata();
    let bytes = our_bytes(&tensors, &meta);

    let read = reference::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(read.len(), tensors.len());
    for (name, shape, data) in &tensors {
        let view = read.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        assert_eq!(view.data(), le_bytes(data).as_slice(), "{name}");
    }
    let (_, header) = reference::SafeTensors::read_metadata(&bytes).unwrap();
    let their_meta = header.metadata().clone().unwrap();
    assert_eq!(their_meta, meta.into_iter().collect::<HashMap<_, _>>());
}

#[test]
fn we_read_what_the_reference_writes() {
    let tensors = sample();
    let meta = sample_metadata();
    let bytes = reference_bytes(&tensors, Some(meta.clone().into_iter().collect()));

    let read = ours::deserialize(&bytes, "reference").unwrap();
    assert_eq!(read.metadata, meta);
    assert_eq!(read.tensors.len(), tensors.len());
    for (name, shape, data) in &tensors {
        let tensor = read.get(name).unwrap();
        assert_eq!(&tensor.shape, shape, "{name}");
        assert_eq!(le_bytes(&tensor.data), le_bytes(data), "{name}");
    }

    let without_metadata = reference_bytes(&tensors, None);
    assert!(ours::deserialize(&without_metadata, "reference").unwrap().metadata.is_empty());
}

/// With at most one metadata key (the reference keeps metadata in a `HashMap`, so with more its
/// order varies run to run) the two writers agree byte for byte: same header text, same
/// padding, same tensor order.
#[test]
fn both_writers_give_identical_bytes() {
    let tensors = sample();
    assert_eq!(our_bytes(&tensors, &BTreeMap::new()), reference_bytes(&tensors, None));

    let one = BTreeMap::from([("format".to_string(), "lego".to_string())]);
    let one_map = Some(one.clone().into_iter().collect());
    assert_eq!(our_bytes(&tensors, &one), reference_bytes(&tensors, one_map));
}

/// A file the reference refuses we refuse too, and the other way round, for a few corruptions.
#[test]
fn both_readers_reject_the_same_corruptions() {
    let bytes = our_bytes(&sample(), &sample_metadata());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated data", bytes[..bytes.len() - 1].to_vec()),
        ("trailing byte", [bytes.as_slice(), &[0]].concat()),
        ("header length too large", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            b
        }),
    ];
    // A dtype other than F32: rewrite the first one in the header (same length, so the layout
    // is otherwise intact). The reference accepts I32 of course; we must refuse it by name.
    let at = bytes.windows(5).position(|w| w == b"\"F32\"").unwrap();
    let mut i32_file = bytes.clone();
    i32_file[at..at + 5].copy_from_slice(b"\"I32\"");
    assert!(reference::SafeTensors::deserialize(&i32_file).is_ok());
    match ours::deserialize(&i32_file, "f") {
        Err(lego::Error::Format(msg)) => assert!(msg.contains("dtype is I32"), "{msg}"),
        other => panic!("expected a dtype error, got {other:?}"),
    }

    for (what, corrupt) in cases {
        assert!(reference::SafeTensors::deserialize(&corrupt).is_err(), "reference: {what}");
        assert!(ours::deserialize(&corrupt, "f").is_err(), "ours: {what}");
    }
}
