// The console's live tail: follows /api/v1/stream (Server-Sent Events; the session cookie
// admits it) and puts each event at the top of the table, every value as textContent, with
// what displays as nothing or reorders the text after it written as an escape (visible()).
(function () {
  "use strict";
  var status = document.getElementById("tail-status");
  var rows = document.getElementById("tail-rows");
  if (!status || !rows) return;
  if (!window.EventSource) {
    status.textContent = "This browser cannot follow a live stream.";
    return;
  }
  var MAX_ROWS = 200;
  var source = new EventSource("/api/v1/stream");
  // The server's present.shown: control characters but tab and line feed, and the format
  // and separator characters (bidirectional overrides, zero-width spaces, the BOM) as \uXXXX;
  // the zero-width joiner and non-joiner stay (scripts and emoji need them).
  var HIDDEN = /(?![\t\n\u200c\u200d])[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;
  function visible(text) {
    return text.replace(HIDDEN, function (c) {
      var out = "";
      for (var i = 0; i < c.length; i++) out += "\\u" + ("000" + c.charCodeAt(i).toString(16)).slice(-4);
      return out;
    });
  }
  function cell(tr, text, label) {
    var td = document.createElement("td");
    td.setAttribute("data-label", label);
    if (typeof text === "string") td.textContent = visible(text); else td.appendChild(text);
    tr.appendChild(td);
  }
  source.onopen = function () {
    status.textContent = "Live: new events appear at the top.";
    status.className = "ok";
  };
  // Each message is `event: event` with the StreamEvent JSON (docs/admin.md): its body is
  // in `payload` (null when the server could not re-encode it).
  source.addEventListener("event", function (message) {
    var event;
    try { event = JSON.parse(message.data); } catch (e) { return; }
    if (!event || typeof event !== "object") return;
    var payload = event.payload && typeof event.payload === "object" ? event.payload : {};
    var id = String(event.id || "");
    var data = payload.data && typeof payload.data === "object" ? payload.data : {};
    var when = String(event.received_at || new Date().toISOString());
    var tr = document.createElement("tr");
    cell(tr, when.slice(0, 19).replace("T", " "), "Received");
    var link = document.createElement("a");
    link.href = "/event?id=" + encodeURIComponent(id);
    link.className = "mono";
    link.textContent = visible(id);
    cell(tr, link, "Event");
    cell(tr, String(event.type || ""), "Type");
    cell(tr, typeof data.title === "string" ? data.title : "", "Title");
    rows.insertBefore(tr, rows.firstChild);
    while (rows.childNodes.length > MAX_ROWS) rows.removeChild(rows.lastChild);
  });
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) {
      status.textContent = "The live stream is not available from this server. Reload the page to try again.";
      status.className = "error";
    } else {
      status.textContent = "Connection lost: reconnecting…";
      status.className = "muted";
    }
  };
})();
