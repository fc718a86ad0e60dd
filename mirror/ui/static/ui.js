// Copy buttons next to `docker pull` commands (the page works without this script).
document.addEventListener("click", function (event) {
  var button = event.target.closest("button.copy");
  if (!button || !navigator.clipboard) return;
  navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
    button.textContent = "copied";
    setTimeout(function () { button.textContent = "copy"; }, 1500);
  });
});
