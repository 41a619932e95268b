"""Broadcast: every connected agent gets it once; the sender only when it asks."""

from __future__ import annotations

from tests.helpers import assert_eventually


async def test_broadcast_reaches_every_agent_once_but_not_the_sender(make_agent, inbox):
    sender = await make_agent("announcer")
    sender_box = inbox(sender)
    boxes = [inbox(await make_agent(f"listener-{i}")) for i in range(5)]
    await sender.broadcast({"notice": "deploy at 5"})
    await assert_eventually(lambda: all(len(b.messages) == 1 for b in boxes))
    for box in boxes:
        assert box.messages[0].broadcast is True
        assert box.messages[0].sender == "announcer"
    marker = await sender.broadcast("marker", include_self=True)
    await assert_eventually(lambda: any(m.id == marker for m in sender_box.messages))
    assert [m.payload for m in sender_box.messages] == ["marker"]
    await assert_eventually(lambda: all(len(b.messages) == 2 for b in boxes))
