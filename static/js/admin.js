// The admin's "Stop selected" message follows the runs it could not yet call stopped, so an
// operator sees the provider's confirmation arrive without reloading. Polls the admin's own
// JSON (runs/admin.py outcomes_view) once a second for up to five minutes.
(function () {
  "use strict";

  var EVERY_MS = 1000;
  var TRIES = 300;

  function follow(el) {
    var item = el.closest("li");
    var note = document.createElement("span");
    note.className = "rb-follow";
    note.setAttribute("role", "status");
    note.textContent = " Following…";
    el.after(note);
    var tries = 0;

    function poll() {
      tries += 1;
      fetch(el.dataset.followUrl + "?ids=" + encodeURIComponent(el.dataset.followRuns), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      })
        .then(function (answer) {
          if (!answer.ok) throw new Error("HTTP " + answer.status);
          return answer.json();
        })
        .then(function (data) {
          var runs = data.runs || [];
          var waiting = runs.filter(function (run) { return !run.settled; });
          var words = runs.map(function (run) { return run.text; }).join("; ");
          runs.forEach(updateRow);
          if (!waiting.length) {
            note.textContent = " Now: " + words + ".";
            if (item && runs.every(function (run) { return run.status === "stopped"; })) {
              item.className = "success";
            }
            return;
          }
          note.textContent = " Now: " + words + ".";
          if (tries < TRIES) {
            setTimeout(poll, EVERY_MS);
          } else {
            note.textContent += " Reload the page for later news.";
          }
        })
        .catch(function () {
          note.textContent = " Could not check on these runs; reload the page to see them.";
        });
    }

    setTimeout(poll, EVERY_MS);
  }

  // The changelist row of a followed run: its cells are replaced with the server's own.
  function updateRow(run) {
    var box = document.querySelector('input[name="_selected_action"][value="' + run.id + '"]');
    var row = box && box.closest("tr");
    if (!row || !run.cells) return;
    Object.keys(run.cells).forEach(function (name) {
      var cell = row.querySelector("td.field-" + name + ", th.field-" + name);
      if (cell) cell.innerHTML = run.cells[name];
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-follow-runs]").forEach(follow);
  });
})();
