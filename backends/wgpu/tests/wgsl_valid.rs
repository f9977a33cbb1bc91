//! Every WGSL kernel variant parses, validates with no capability beyond the ones it declares
//! (the portable variants: none), and translates to SPIR-V (Vulkan) and MSL (Metal). Needs no GPU.

use moe_ep_wgpu::kernels::Variant;

#[test]
fn every_kernel_validates_and_translates() {
    let variants = Variant::all();
    assert!(variants.len() >= 8);
    for v in variants {
        let src = v.source();
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}: {}", v.label(), e.emit_to_string(&src)));
        let mut caps = naga::valid::Capabilities::empty();
        for c in v.capabilities().split('|').filter(|c| !c.is_empty()) {
            caps |= match c {
                "SHADER_FLOAT16_IN_FLOAT32" => naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
                "SHADER_FLOAT16" => naga::valid::Capabilities::SHADER_FLOAT16,
                "COOPERATIVE_MATRIX" => naga::valid::Capabilities::COOPERATIVE_MATRIX,
                other => panic!("{}: unknown capability {other}", v.label()),
            };
        }
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", v.label(), e.emit_to_string(&src)));
        assert_eq!(module.entry_points.len(), 1, "{}: one entry point", v.label());
        assert_eq!(module.entry_points[0].name, "main");
        assert_eq!(module.entry_points[0].workgroup_size, [v.threads(), 1, 1], "{}", v.label());
        let spv = naga::back::spv::write_vec(&module, &info, &Default::default(), None)
            .unwrap_or_else(|e| panic!("{}: SPIR-V: {e}", v.label()));
        assert!(spv.len() > 100, "{}: SPIR-V too short", v.label());
        // Metal has 8x8 simdgroup matrices only (MSL 2.3, macOS 11): the 16x16 variants are
        // for Vulkan (and DX12) and translate to SPIR-V only.
        let coop = v.mma.s != 0;
        if coop && v.mma.s != 8 {
            continue;
        }
        let msl_opts = naga::back::msl::Options {
            lang_version: if coop { (2, 3) } else { naga::back::msl::Options::default().lang_version },
            ..Default::default()
        };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &msl_opts, &Default::default())
            .unwrap_or_else(|e| panic!("{}: MSL: {e}", v.label()));
        assert!(msl.contains("kernel"), "{}: MSL has no kernel function", v.label());
        if coop {
            assert!(msl.contains("simdgroup_multiply_accumulate"), "{}: MSL without simdgroup matrices", v.label());
        }
    }
}
