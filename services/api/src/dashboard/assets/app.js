// Capstan's dashboard script: it makes pages live and is never needed to use them (every
// action is a plain form). One stream of changes per page (`data-live` on <body>), one
// stream of output on a job's page; both are closed when the page is left.
"use strict";
(function () {
  var streams = [];
  function open(url) {
    var source = new EventSource(url);
    streams.push(source);
    return source;
  }
  window.addEventListener("pagehide", function () {
    streams.forEach(function (s) { s.close(); });
    streams = [];
  });

  // Times in the reader's own zone.
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var at = new Date(el.getAttribute("datetime"));
      if (!isNaN(at)) {
        el.title = el.getAttribute("datetime");
        el.textContent = at.toLocaleString();
      }
    });
  }
  localTimes(document);

  // Refreshing the parts of the page marked `data-refresh` from the page itself, at most
  // once a second, keeping whatever holds the focus.
  var pending = null, last = 0;
  function refresh() {
    if (pending) return;
    var wait = Math.max(0, 1000 - (Date.now() - last));
    pending = setTimeout(function () {
      pending = null;
      last = Date.now();
      fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) {
          if (r.redirected && r.url.indexOf("/ui/login") !== -1) { location.href = r.url; return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (text) {
          if (!text) return;
          var fresh = new DOMParser().parseFromString(text, "text/html");
          fresh.querySelectorAll("[data-refresh][id]").forEach(function (el) {
            var here = document.getElementById(el.id);
            if (!here || here.contains(document.activeElement)) return;
            if (here.innerHTML !== el.innerHTML) {
              here.innerHTML = el.innerHTML;
              localTimes(here);
            }
          });
        })
        .catch(function () {});
    }, wait);
  }

  var live = document.body.getAttribute("data-live");
  if (live && window.EventSource) {
    var first = true;
    var changes = open(live);
    changes.addEventListener("open", function () {
      // After a reconnection, what happened in between is not known: look again.
      if (!first) refresh();
      first = false;
    });
    changes.addEventListener("change", refresh);
    changes.addEventListener("resync", refresh);
  }
  // The mesh's health, and pages without events of their own, are looked at now and then.
  setInterval(function () { if (!document.hidden) refresh(); }, 15000);

  // A job's output as it is written.
  var output = document.getElementById("output");
  if (output && output.getAttribute("data-src") && window.EventSource) {
    var ended = false, opened = 0;
    var source = open(output.getAttribute("data-src"));
    source.addEventListener("open", function () {
      // A reconnected stream starts from the beginning again.
      if (opened++ > 0) output.textContent = "";
    });
    var show = function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      var atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      if (event.kind === "stdout" || event.kind === "stderr") {
        var text = document.createTextNode(event.data || "");
        if (event.kind === "stderr") {
          var span = document.createElement("span");
          span.className = "err";
          span.appendChild(text);
          output.appendChild(span);
        } else {
          output.appendChild(text);
        }
      } else if (event.kind === "end") {
        ended = true;
        source.close();
        var end = document.createElement("span");
        end.className = "end";
        end.textContent = "\n— " + (event.status || "ended") +
          (event.exit_code !== undefined && event.exit_code !== null ? ", exit " + event.exit_code : "") + " —";
        output.appendChild(end);
        refresh();
      }
      if (atBottom) output.scrollTop = output.scrollHeight;
    };
    // The API names each message by its kind.
    ["stdout", "stderr", "end", "message"].forEach(function (kind) {
      source.addEventListener(kind, show);
    });
    source.onerror = function () { if (ended) source.close(); };
  }
})();
