"""Every Redis key and channel name agentpost uses, in one place. All start with the prefix
(AGENTPOST_KEY_PREFIX, default "agentpost"), so several deployments can share one Redis."""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.agents = f"{prefix}:agents"  # SET of every known agent id
        self.servers = f"{prefix}:servers"  # SET of server ids that hold sessions
        self.topics_channel = f"{prefix}:ch:topics"
        self.broadcast_channel = f"{prefix}:ch:broadcast"
        self.presence_channel = f"{prefix}:ch:presence"
        self.wake_channel = f"{prefix}:ch:wake"
        self.tasks_channel = f"{prefix}:ch:tasks"  # a task id, after each of its events
        self.workflows_channel = f"{prefix}:ch:wf"  # a workflow run id, after its events
        self.dead_letters = f"{prefix}:dead"  # STREAM of undeliverable messages, with reasons
        self.broadcast_log = f"{prefix}:broadcasts"  # STREAM of recent broadcasts
        self.topic_log = f"{prefix}:topiclog"  # STREAM of recent topic publishes
        self.audit = f"{prefix}:audit"  # STREAM: actor, action, subject, t, d (details JSON)

    def agent(self, agent_id: str) -> str:
        """HASH: capabilities, metadata (JSON), first_seen, connected_since, last_seen (unix ms),
        bpos (the last broadcast-log id acknowledged), dead (messages dead-lettered)."""
        return f"{self.prefix}:agent:{agent_id}"

    def agent_sessions(self, agent_id: str) -> str:
        """HASH: session id -> "<server id> <instance id>", for the agent's live sessions."""
        return f"{self.prefix}:agent:{agent_id}:sessions"

    def capability(self, capability: str) -> str:
        """SET of the agents advertising a capability (kept by the presence scripts)."""
        return f"{self.prefix}:cap:{capability}"

    def mailbox(self, agent_id: str) -> str:
        """STREAM: the agent's unacknowledged direct messages (consumer group "g")."""
        return f"{self.prefix}:mbox:{agent_id}"

    def idempotency(self, sender: str, key: str) -> str:
        """STRING with a TTL: the message id first stored under a sender's idempotency key."""
        return f"{self.prefix}:idem:{sender}:{key}"

    def durable_patterns(self, agent_id: str) -> str:
        """HASH: durable subscription name -> its patterns (JSON list)."""
        return f"{self.prefix}:dsub:{agent_id}"

    def durable_positions(self, agent_id: str) -> str:
        """HASH: durable subscription name -> the last topic-log id acknowledged."""
        return f"{self.prefix}:dpos:{agent_id}"

    def server_alive(self, server_id: str) -> str:
        """STRING with a TTL, refreshed by the server's heartbeat."""
        return f"{self.prefix}:server:{server_id}"

    def server_sessions(self, server_id: str) -> str:
        """HASH: session id -> agent id, for the sessions a server holds."""
        return f"{self.prefix}:server:{server_id}:sessions"

    def server_channel(self, server_id: str) -> str:
        return f"{self.prefix}:ch:srv:{server_id}"
