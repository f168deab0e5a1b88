"""`edge-agent check FILE...`: validate profiles without starting anything."""

from __future__ import annotations

import argparse
import json
import sys

from agent.cli.errors import USAGE
from agent.config.errors import ProfileError
from agent.config.profile import load_profile, profile_schema


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="validate device profiles",
        description="Validate device profiles. "
        "Prints FILE:LINE: key.path: message for every problem and exits 2 if there is any. "
        "The files a profile names (keys, TLS files, models, labels) must exist here, unless --no-files.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="profile files (YAML or JSON)")
    p.add_argument("--schema", action="store_true", help="print the profile's JSON Schema instead")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument(
        "--no-files",
        action="store_true",
        help="do not look for the files a profile names (for a profile written for another machine)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(profile_schema(), indent=2))
        return 0
    if not args.files:
        print("edge-agent check: give at least one profile file (or --schema)", file=sys.stderr)
        return USAGE
    failed = False
    for name in args.files:
        try:
            profile = load_profile(name, files="none" if args.no_files else "all")
        except ProfileError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            continue
        if not args.quiet:
            print(f"{name}: ok (device {profile.device.id}, {len(profile.pipelines)} pipeline(s))")
    return USAGE if failed else 0
