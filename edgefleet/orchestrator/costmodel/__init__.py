"""The hardware-aware cost model: predicted latency and memory of a model variant on a device.

Prior. For a variant with M multiply-accumulates (split by operator type into dense convolution or
matrix MACs and depthwise MACs) and L layers on a device, the analytic p50 at 1 thread is

    t(1) = (c_runtime + L * l_runtime) * R_ref / R_fp32 + M_dense / R + M_depthwise / (R * 0.25)

where R_fp32 is the fp32 MAC rate of one core by CPU features (AVX-512, AVX2, NEON), R that rate
times a precision factor and R_ref the rate the overheads are stated for. At n threads it is
t(1) * ((1 - P) + P / n + L * s / t(1)) with n capped at the usable cores: Amdahl's law plus a
synchronisation cost s per layer. The int8 factor is 2 on CPUs with integer dot-product
instructions (avx512_vnni, avx_vnni, amx, dotprod, i8mm) and 0.9 elsewhere: without a measurement
int8 is never assumed to be faster. Memory is the runtime's footprint plus copies of the weights
and of the peak activations (costmodel.analytic).

Calibration. Measured p50s come from on-device benchmarks (BenchmarkStore), the gate's
orchestrator-side latencies (Variant.latency_ms) and the fleet's streamed latency windows
(Store.query_metric_windows). A factor model in log space explains them. At 1 thread the
latency is a per-variant cost times per-hardware-class, per-runtime and per-precision factors (and
a size slope for variants never measured). At n threads it is that times the thread ratio above,
whose two parameters are corrected by runtime, hardware class and precision, times the variant's
own deviation from it. The effects are fitted by robust ridge regression, so each stays at the prior until
measurements move it. So one benchmark refines the prediction of every variant on every device of
that hardware class, and a pair that was measured directly is predicted by its measurement
(costmodel.predictor.CalibratedPredictor).

Threads. The predictor chooses the smallest thread count within 90% of the best speed-up over the
device's thread budget (common.amdahl.choose_threads), on measured latencies where they exist.
"""
