"""A Syncra bot in Python: answers every message in capitals and offers a /shout command.

Build it into a WebAssembly component (no network needed once componentize-py is installed):

    pip install componentize-py==0.25.1
    componentize-py -d ../../../plugin-sdk/wit -w bot componentize app -o python_shout.wasm

and run it with `syncra bot run python_shout.wasm`.
"""

from typing import List

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Action, Action_Reply, CommandInfo, Level, Message


class Handler(exports.Handler):
    def commands(self) -> List[CommandInfo]:
        return [CommandInfo(name="shout", help="shout TEXT — say TEXT in capitals")]

    def on_message(self, msg: Message) -> List[Action]:
        count = int.from_bytes(host.kv_get("count") or b"\x00", "little") + 1
        host.kv_set("count", count.to_bytes(8, "little"))
        who = msg.sender_handle or msg.sender
        host.log(Level.INFO, f"message {count} from {who}")
        return [Action_Reply(msg.text.upper() + "!")]

    def on_command(self, name: str, args: str, conversation: str) -> List[Action]:
        return [Action_Reply(args.upper() + "!")]
