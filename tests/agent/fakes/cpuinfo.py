"""/proc/cpuinfo texts of CPUs the test machine lacks, trimmed to the fields the probe reads."""

from __future__ import annotations

# Intel Xeon (Sapphire Rapids): AVX-512 VNNI, AVX-VNNI and AMX; two processors listed.
_XEON_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid pni pclmulqdq ssse3 fma cx16 "
    "pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 "
    "wbnoinvd arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize amx_bf16 "
    "avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities"
)
XEON_SAPPHIRE_RAPIDS = "".join(
    f"processor\t: {index}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
    f"model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: {_XEON_FLAGS}\n\n"
    for index in range(2)
)

# Raspberry Pi 5 (Cortex-A76, aarch64): NEON, dot product and FP16, no "model name" line.
_A76_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
)
RASPBERRY_PI_5 = (
    "".join(
        f"processor\t: {index}\nBogoMIPS\t: 108.00\nFeatures\t: {_A76_FEATURES}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
        for index in range(4)
    )
    + "Revision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)

# A big.LITTLE SoC (RK3588: four Cortex-A55 and four Cortex-A76). In this fake only the A76 cores list
# asimddp (real A55 cores have it too), so it checks that a feature counts only when every core has it.
RK3588 = "".join(
    f"processor\t: {index}\nFeatures\t: fp asimd fphp asimdhp{' asimddp' if part == '0xd0b' else ''}\n"
    f"CPU implementer\t: 0x41\nCPU part\t: {part}\n\n"
    for index, part in enumerate(["0xd05"] * 4 + ["0xd0b"] * 4)
)

# 32-bit Raspberry Pi OS on a Cortex-A72 (armv7l): NEON is listed as "neon".
ARMV7_CORTEX_A72 = (
    "processor\t: 0\nmodel name\t: ARMv7 Processor rev 3 (v7l)\n"
    "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\n"
    "CPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2711\n"
)
