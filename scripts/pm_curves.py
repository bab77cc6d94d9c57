"""DRAM read throughput over one call of each kernel, from Nsight Compute's PM sampling (a diagnostic).

ncu samples the hardware counters every ~1.5 us through a kernel (`--section PmSampling`); this prints,
for each profiled kernel, the DRAM read throughput curve (% of peak) and its summary: the steady middle
(median and mean after the first 15 samples and before the last 8), and the sums over the first 15 and
the last 8 samples (the ramp and the tail). Same bytes give the same total, so the curves show where one
kernel's extra time goes. On the device (benchmarks/gpu_attention.py --probe runs ours, then cuDNN):
    ncu --clock-control none --section PmSampling -k regex:"decode_tc_kernel|fprop" -o pm \\
        python3 benchmarks/gpu_attention.py --probe --batches 16 --contexts 16384
    ncu -i pm.ncu-rep --page raw --print-metric-instances values --csv > pm.csv
    python3 scripts/pm_curves.py pm.csv"""
import csv
import statistics
import sys

READ = "FBSP.TriageCompute.dramc__read_throughput.avg.pct_of_peak_sustained_elapsed"
HEAD, TAIL = 15, 8


def curves(path: str) -> dict[str, list[float]]:
    """kernel name -> the DRAM read samples from its first to its last one above 1 %."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index(READ)
    out = {}
    for r in rows[2:]:
        vals = [float(x.replace(",", "")) for x in r[col].strip("()").split(";")]
        live = [i for i, x in enumerate(vals) if x > 1]
        out[r[4]] = vals[live[0]:live[-1] + 1]
    return out


def main() -> None:
    for path in sys.argv[1:]:
        print(f"## {path}")
        print("| kernel | samples | total | middle median % | middle mean % | first 15 | last 8 |")
        print("|---|---|---|---|---|---|---|")
        got = curves(path)
        for name, c in got.items():
            mid = c[HEAD:-TAIL]
            print(f"| {name[:60]} | {len(c)} | {sum(c):.0f} | {statistics.median(mid):.1f} | "
                  f"{statistics.mean(mid):.1f} | {sum(c[:HEAD]):.0f} | {sum(c[-TAIL:]):.0f} |")
        for name, c in got.items():
            print(f"\n{name[:60]}:\n" + " ".join(f"{x:.0f}" for x in c))


if __name__ == "__main__":
    main()
