#!/usr/bin/env bash
# 50 000 idle authenticated connections to one relay; reports relay RSS per connection. The
# generator spreads its sockets over 127.0.0.1–127.0.0.5 (28 000 ephemeral ports per source
# address). Needs an open-file hard limit above 50 512 for both processes; says so otherwise.
# Usage: bench/scenarios/idle-50k.sh
exec "$(dirname "$0")/idle.sh" 50000
