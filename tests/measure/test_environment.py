from compactnn.measure.environment import cpu_description, environment

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx512f avx512_vnni amx_bf16 amx_tile amx_int8
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx512f avx512_vnni avx512_bf16
"""


def test_cpu_description_names_the_model_and_amx():
    assert cpu_description(XEON) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, AMX"
    assert cpu_description(ZEN4) == "AMD EPYC 9B14, no AMX"  # avx512 but no amx_tile
    assert cpu_description("").endswith(", AMX unknown")


def test_environment_keeps_extra_fields_and_names_the_cpu():
    env = environment(2, runs=7, quick=True)
    assert (env["threads"], env["runs"], env["quick"]) == (2, 7, True)
    assert "AMX" in env["machine"] and env["machine"].endswith("CPUs")
