"""The hardware-aware cost model: predicted latency and memory of a model variant on a device.

Prior. For a variant with M multiply-accumulates (split by operator type into dense convolution or
matrix MACs and depthwise MACs) and L layers on a device, the analytic p50 at n threads is

    t(n) = c_runtime + L * l_runtime + T_1 / speedup(p, min(n, usable cores))

where T_1 = M_dense / R + M_depthwise / (R * 0.25), R is the fp32 MAC rate of one core by CPU
features (AVX-512, AVX2, NEON) times a precision factor, speedup is Amdahl's law and the parallel
fraction p grows with the MACs per layer. The int8 factor is 2 on CPUs with integer dot-product
instructions (avx512_vnni, avx_vnni, amx, dotprod, i8mm) and 0.9 elsewhere: without a measurement
int8 is never assumed to be faster. Memory is the runtime's footprint plus copies of the weights
and of the peak activations (costmodel.analytic).

Calibration. Measured p50s come from on-device benchmarks (BenchmarkStore), the gate's
orchestrator-side latencies (Variant.latency_ms) and the fleet's streamed latency windows
(Store.query_metric_windows). Their log residuals against the prior are fitted by ridge
regression as a sum of effects: the variant, the variant at more than one thread, the hardware
class x runtime x threads, the hardware class x runtime, the hardware class x runtime x precision
and the runtime x precision x dot-product capability. So one benchmark refines the prediction of
every variant on every device of that hardware class, and a pair that was measured directly is
predicted by its measurement (costmodel.predictor.CalibratedPredictor).

Threads. The predictor chooses the smallest thread count within 90% of the best speed-up over the
device's thread budget (common.amdahl.choose_threads), on measured latencies where they exist.
"""
