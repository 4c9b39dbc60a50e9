#!/usr/bin/env python3
"""Regenerates the screen captures in docs/TUI.md from the TUI snapshot tests.

Run after `INSTA_UPDATE=always cargo test -p syncra-ui-ratatui` when screens change on purpose.
Everything above the line '## Screens' in docs/TUI.md is kept as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPS = os.path.join(ROOT, 'plugins/ui-ratatui/tests/snapshots')
DOC = os.path.join(ROOT, 'docs/TUI.md')

SECTIONS = [
    ("Onboarding: welcome", "onboarding_1_welcome"),
    ("Onboarding: relay (checked for reachability and TLS)", "onboarding_2_relay_checking"),
    ("Onboarding: handle with a live availability check", "onboarding_3_handle_free"),
    ("Onboarding: a taken handle", "onboarding_handle_taken"),
    ("Onboarding: passphrase with confirmation and a strength hint", "onboarding_4_passphrase"),
    ("Onboarding: done — user id, fingerprint and what the passphrase protects", "onboarding_5_done"),
    ("Unlock", "unlock"),
    ("Unlock after a wrong passphrase", "unlock_failed"),
    ("Main screen: conversations with unread counts, day separators, delivery marks", "main"),
    ("Scrolled up with new messages below", "scrolled_new_below"),
    ("A contact whose key changed: sending blocked, messages held", "key_changed"),
    ("A message request from someone not in the contacts", "message_request"),
    ("Help overlay (every key)", "help"),
    ("Command palette (plugin commands included)", "palette"),
    ("Safety number", "safety_number"),
    ("Narrow terminal (40×12): the conversation only; Tab shows the list", "narrow_40x12"),
    ("Wide terminal (160×48)", "wide_160x48"),
]


def screen(name):
    text = open(os.path.join(SNAPS, f'screens__{name}.snap')).read().split('---\n', 2)[2]
    rows = []
    for line in text.strip('\n').split('\n'):
        line = line.strip()
        if line.startswith('"') and line.endswith('"'):
            rows.append(line[1:-1].rstrip())
    return '\n'.join(rows)


head = open(DOC).read().split('## Screens')[0] if os.path.exists(DOC) else ''
out = head + '## Screens\n'
for title, name in SECTIONS:
    out += f'\n### {title}\n\n```text\n{screen(name)}\n```\n'
open(DOC, 'w').write(out)
