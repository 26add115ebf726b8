"""The sqs handler against moto's server (a standard and a FIFO queue), read back with boto3."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest
from pytest_httpserver import HTTPServer

from lacuna_webhooks.errors import PermanentError, RetryLater
from lacuna_webhooks.handlers.brokers.sqs import SQSHandler
from tests.e2e.conftest import free_port
from tests.integration.brokers import build, event
from tests.integration.servers import moto_endpoint_fixture  # noqa: F401 - fixture, used by name


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS chain reads the environment: test credentials, no region (the handler's wins)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def sqs(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def queue(endpoint: str, *, fifo: bool) -> str:
    name = f"lw-test-{uuid.uuid4().hex[:10]}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    return str(sqs(endpoint).create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def handler(queue_url: str, endpoint: str, name: str = "sqs", **settings: str) -> SQSHandler:
    return build(
        SQSHandler, name, QUEUE_URL=queue_url, ENDPOINT=endpoint, REGION="us-east-1", **settings
    )


def receive_all(endpoint: str, queue_url: str) -> list[dict[str, Any]]:
    client = sqs(endpoint)
    messages: list[dict[str, Any]] = []
    while True:
        batch = client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            WaitTimeSeconds=0,
        ).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)
        for m in batch:
            client.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])


async def test_standard_queue_gets_the_bytes_and_attributes(moto_endpoint: str) -> None:
    """Body = the event's bytes; attributes event_id and event_type; a handler named other than
    its kind reads its own settings; one message per event."""
    url = queue(moto_endpoint, fifo=False)
    h = handler(url, moto_endpoint, name="jobs_queue")
    first, second = event(), event("job.failed")
    try:
        await h.handle(first)
        await h.handle(second)
    finally:
        await h.aclose()
    messages = sorted(
        receive_all(moto_endpoint, url), key=lambda m: m["Body"] != first.raw.decode()
    )
    assert [m["Body"].encode() for m in messages] == [first.raw, second.raw]
    attributes = messages[0]["MessageAttributes"]
    assert attributes["event_id"] == {"DataType": "String", "StringValue": first.id}
    assert attributes["event_type"] == {"DataType": "String", "StringValue": "job.completed"}


async def test_fifo_queue_drops_a_republish_and_groups_by_task(moto_endpoint: str) -> None:
    """FIFO: MessageGroupId is the task id and MessageDeduplicationId the event id, so the same
    event sent twice is one message."""
    url = queue(moto_endpoint, fifo=True)
    h = handler(url, moto_endpoint)
    same, other = event(task_id="task_a"), event(task_id="task_b")
    try:
        await h.handle(same)
        await h.handle(same)
        await h.handle(other)
    finally:
        await h.aclose()
    messages = receive_all(moto_endpoint, url)
    assert sorted(m["Body"].encode() for m in messages) == sorted([same.raw, other.raw])
    groups = {m["MessageAttributes"]["event_id"]["StringValue"]: m for m in messages}
    assert groups[same.id]["Attributes"]["MessageGroupId"] == "task_a"
    assert groups[same.id]["Attributes"]["MessageDeduplicationId"] == same.id


async def test_a_missing_queue_is_dead_with_the_reason(moto_endpoint: str) -> None:
    """A queue URL that names no queue: dead with SQS's error code."""
    url = f"{moto_endpoint}/123456789012/missing-{uuid.uuid4().hex[:8]}"
    h = handler(url, moto_endpoint)
    try:
        with pytest.raises(PermanentError, match=r"NonExistentQueue|QueueDoesNotExist"):
            await h.handle(event())
    finally:
        await h.aclose()


async def test_a_message_too_long_is_dead(moto_endpoint: str) -> None:
    """An event over SQS's message size limit: dead with SQS's reason, not retried."""
    url = queue(moto_endpoint, fifo=False)
    h = handler(url, moto_endpoint)
    try:
        with pytest.raises(PermanentError, match="SQS refused the message"):
            await h.handle(event(padding="x" * 1_100_000))
    finally:
        await h.aclose()
    assert receive_all(moto_endpoint, url) == []


async def test_an_unreachable_endpoint_is_retried() -> None:
    """Nothing listening on the endpoint's port: RetryLater."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    h = handler(f"{endpoint}/123456789012/q", endpoint, CONNECT_TIMEOUT="1")
    try:
        with pytest.raises(RetryLater, match="sending to SQS failed"):
            await h.handle(event())
    finally:
        await h.aclose()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>Welcome to the gateway</body></html>", "text/html"),
        (b"", "text/plain"),
        (b"{}", "application/x-amz-json-1.0"),
        (  # an answer shaped like SQS's, for a body other than the one sent
            b'{"MessageId": "5fea7756-0ea4-451a-a703-a558b933e274",'
            b' "MD5OfMessageBody": "fafb00f5732ab283681e124bf8747ed1"}',
            "application/x-amz-json-1.0",
        ),
    ],
    ids=["html", "empty", "empty-json", "wrong-md5"],
)
async def test_a_200_that_is_not_a_sendmessage_reply_is_never_taken_as_sent(
    httpserver: HTTPServer, body: bytes, content_type: str
) -> None:
    """Something other than SQS at the endpoint (a gateway's or a proxy's page, another
    server on the port) answering 200: botocore parsed it as an empty reply and the attempt
    was recorded done with no message in any queue. Done only on SQS's own answer (a
    MessageId, and the MD5 of the body sent); anything else is retried."""
    httpserver.expect_request("/").respond_with_data(body, content_type=content_type)
    endpoint = httpserver.url_for("/").rstrip("/")
    h = handler(f"{endpoint}/123456789012/q", endpoint, READ_TIMEOUT="2")
    try:
        with pytest.raises(RetryLater, match="SQS did not confirm the message"):
            await h.handle(event())
    finally:
        await h.aclose()
