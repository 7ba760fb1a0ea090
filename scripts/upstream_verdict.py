"""Judge a run of the original's test suite: pass unless a test outside the expected list failed.

usage: upstream_verdict.py REPORT.xml EXPECTED.txt  (EXPECTED: "file::test  reason" per line)
"""

import sys
import xml.etree.ElementTree as ET


def outcomes(report: str) -> dict[str, str]:
    found = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}.py::{case.get('name')}"
        bad = [child.tag for child in case if child.tag in ("failure", "error")]
        skipped = any(child.tag == "skipped" for child in case)
        found[name] = bad[0] if bad else "skipped" if skipped else "passed"
    return found


def expected(path: str) -> set[str]:
    with open(path) as lines:
        return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def main(report: str, expected_path: str) -> int:
    found, allowed = outcomes(report), expected(expected_path)
    passed = sorted(name for name, outcome in found.items() if outcome == "passed")
    failed = sorted(name for name, outcome in found.items() if outcome in ("failure", "error"))
    print(f"upstream tests: {len(passed)} of {len(found)} passed")
    for name in failed:
        print(f"  {'expected' if name in allowed else 'UNEXPECTED'} failure: {name}")
    unexpected = [name for name in failed if name not in allowed]
    if not found or unexpected:
        print("test-upstream: FAILED" if found else "test-upstream: no test ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
