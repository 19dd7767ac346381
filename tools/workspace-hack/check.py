#!/usr/bin/env python3
"""Fails when make test's cargo commands would build a shared dependency with different features
(each difference rebuilds that dependency and everything above it). Reads `cargo tree` for each
package selection make test uses; the fix is the union in tools/workspace-hack/Cargo.toml."""
import collections
import subprocess
import sys

# The package selections of make test's native cargo commands (mk/*.mk).
SELECTIONS = [
    ["-p", "filter"],
    ["-p", "e2e", "--features", "e2e"],
    ["-p", "auto-ai-router"],
    ["-p", "rls-double"],
    ["-p", "host-sim"],
    ["-p", "oci-image"],
]


def features(sel):
    out = subprocess.run(
        ["cargo", "tree", "--quiet", "-e", "normal,build,dev", "--prefix", "none", "-f", "{p}|{f}", *sel],
        check=True, capture_output=True, text=True,
    ).stdout
    seen = collections.defaultdict(set)
    for line in out.splitlines():
        pkg, _, feats = line.replace(" (*)", "").replace(" (proc-macro)", "").partition("|")
        if "(/" not in pkg:  # registry packages; members are the same source either way
            seen[pkg].add(feats)
    return seen


def main():
    per = {" ".join(s): features(s) for s in SELECTIONS}
    bad = []
    for pkg in sorted(set().union(*per.values())):
        # A package built for both host and target shows two feature lists: compare their union.
        sets = {sel: ",".join(sorted({x for fs in f[pkg] for x in fs.split(",") if x})) for sel, f in per.items() if pkg in f}
        if len(set(sets.values())) > 1:
            bad.append(pkg)
            print(f"{pkg}: features differ between make test's builds:")
            for sel, f in sets.items():
                print(f"    {sel:32} {f or '(none)'}")
    if bad:
        print(f"\n{len(bad)} dependencies would be built more than once: add the union of their features "
              "to tools/workspace-hack/Cargo.toml")
        return 1
    print(f"workspace-hack: one feature set per dependency across {len(SELECTIONS)} package selections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
