"""The daemon's handlers for remote commands (the dispatcher in dispatch.py owns parsing and replies)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import cv2

from agent.config.base import plain
from agent.service.commands.dispatch import CommandDispatcher, CommandError
from agent.util import redact

if TYPE_CHECKING:  # the daemon registers these handlers: a runtime import would be a cycle
    from agent.models.updater import Updater
    from agent.service.daemon import Daemon, Parts

SNAPSHOT_JPEG_QUALITY = 85


def register_commands(dispatcher: CommandDispatcher, daemon: Daemon) -> None:
    def parts() -> Parts:
        if daemon.parts is None:
            raise CommandError("the agent is stopping", "failed")
        return daemon.parts

    def updater() -> Updater:
        running = parts().updater
        if running is None:
            raise CommandError("this device has no registry section", "not_available")
        return running

    def update(args: dict[str, Any]) -> object:
        return {"models": updater().update(only=args.get("model"))}

    def rollback(args: dict[str, Any]) -> object:
        try:
            return updater().rollback(args["model"], args.get("version"))
        except ValueError as exc:  # a damaged store names its file: relative to the state folder, never absolute
            state_dir = str(daemon.profile.device.state_dir).rstrip("/") + "/"
            raise CommandError(str(exc).replace(state_dir, ""), "bad_argument") from None

    def reload(args: dict[str, Any]) -> object:
        done = daemon.reload(defer_restart=True)  # a restart stops this thread: `run`'s thread does it
        if done is None:
            raise CommandError(
                "the profile on disk is invalid; the running profile stays (see the profile.invalid event)"
            )
        return {"reloaded": done.scope, "changed": done.changed, "pipelines": done.pipelines}

    def pipeline(args: dict[str, Any]) -> object:
        name, action = args["name"], args["action"]
        config = next((c for c in daemon.profile.pipelines if c.name == name), None)
        if config is None:
            known = ", ".join(c.name for c in daemon.profile.pipelines) or "none"
            raise CommandError(f"no pipeline named {name!r} (known: {known})", "bad_argument")
        if action in ("stop", "restart"):
            daemon.stop_pipelines([name])
        if action in ("start", "restart") and name not in parts().pipelines:
            daemon.start_pipelines((config,))
            if name not in parts().pipelines:
                raise CommandError(f"pipeline {name!r} did not start (see the pipeline.failed event)")
        running = parts().pipelines.get(name)
        return {"pipeline": name, "state": running.stats()["state"] if running else "stopped"}

    def config(args: dict[str, Any]) -> object:
        return redact.doc(plain(daemon.profile))  # URL credentials, passwords, tokens

    def snapshot(args: dict[str, Any]) -> object:
        width = args.get("max_width")
        if width is not None and width < 1:
            raise CommandError(f"max_width: expected a positive integer, got {width}", "bad_argument")
        running = parts().pipelines.get(args["pipeline"])
        if running is None:
            raise CommandError(f"no running pipeline named {args['pipeline']!r}", "bad_argument")
        latest = running.latest_frame()
        if latest is None:
            raise CommandError(f"pipeline {args['pipeline']!r} has no camera frame yet", "failed")
        image, boxes = latest
        if width and image.shape[1] > width:
            image = cv2.resize(
                image, (width, round(image.shape[0] * width / image.shape[1])), interpolation=cv2.INTER_AREA
            )
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, SNAPSHOT_JPEG_QUALITY])
        if not ok:
            raise CommandError("the frame could not be encoded as JPEG")
        return {
            "pipeline": args["pipeline"],
            "width": image.shape[1],
            "height": image.shape[0],
            "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode(),
            "boxes": boxes,
        }

    # `update` waits on the registry: on a thread of its own, so that ping and rollback answer meanwhile.
    dispatcher.register("update", update, background=True)
    for name, handler in (
        ("rollback", rollback),
        ("reload", reload),
        ("pipeline", pipeline),
        ("config", config),
        ("snapshot", snapshot),
    ):
        dispatcher.register(name, handler)
