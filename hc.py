import socket, sys, time, json, hmac, hashlib, base64, os
SECRET=os.environ["LACUNA_WEBHOOK_SECRET"]
def sign(body, mid):
    t=str(int(time.time()))
    key=base64.b64decode(SECRET.removeprefix("whsec_"))
    sig=base64.b64encode(hmac.new(key, f"{mid}.{t}.".encode()+body, hashlib.sha256).digest()).decode()
    return t, sig
def webhook(eid, extra=b"", version="1.1"):
    body=json.dumps({"id":eid,"type":"job.completed","created_at":"2026-01-01T00:00:00Z","data":{"job_id":"j1"}}).encode()
    t,sig=sign(body, eid)
    return (f"POST /webhooks/lacuna HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\nwebhook-id: {eid}\r\nwebhook-timestamp: {t}\r\nwebhook-signature: v1,{sig}\r\nContent-Length: {len(body)}\r\n".encode()+extra+b"\r\n"+body)
def go(port, data, read=True, timeout=5):
    s=socket.create_connection(("127.0.0.1",port)); s.sendall(data); s.shutdown(socket.SHUT_WR)
    s.settimeout(timeout); out=b""
    try:
        while True:
            c=s.recv(65536)
            if not c: break
            out+=c
    except socket.timeout: out+=b"<TIMEOUT>"
    return out
