//! `sft chat --model DIR [--system TEXT] [sampling flags] [--json]`: multi-turn chat.
//!
//! Each input line is a user message; the reply streams to stdout as it is generated and stops
//! at the template's end-of-turn token. `/reset` forgets the conversation, `/system TEXT` sets
//! the system message (and resets), `/quit` ends. With stdin not a terminal it reads one message
//! per line, so it can be scripted; `--json` prints each reply as one line
//! `{"user":..,"assistant":..,"stopped":bool}` instead of streaming.

use std::io::{BufRead, IsTerminal, Write};

use sft_data::{Message, Role};
use sft_model::generate::generate_streaming;

use crate::common::{ModelArgs, SamplingArgs, TemplateArgs};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// A system message for the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    template: TemplateArgs,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let ck = args.model.open(&args.template)?;
    let params = args.sampling.params(ck.template.stop_ids().to_vec())?;
    let interactive = std::io::stdin().is_terminal();
    let mut system = args.system.clone();
    let mut history: Vec<Message> = vec![];
    let stdout = std::io::stdout();
    if interactive {
        eprintln!(
            "chatting with {} (/reset, /system TEXT, /quit)",
            args.model.path.display()
        );
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let input = line.trim_end_matches('\r');
        if input.trim().is_empty() {
            continue;
        }
        if input == "/quit" || input == "/exit" {
            break;
        }
        if input == "/reset" {
            history.clear();
            if interactive {
                eprintln!("(conversation reset)");
            }
            continue;
        }
        if let Some(rest) = input.strip_prefix("/system") {
            let text = rest.trim();
            system = (!text.is_empty()).then(|| text.to_owned());
            history.clear();
            if interactive {
                eprintln!("(system message set; conversation reset)");
            }
            continue;
        }
        history.push(Message::new(Role::User, input.to_owned()));
        let mut messages = vec![];
        if let Some(s) = &system {
            messages.push(Message::new(Role::System, s.clone()));
        }
        messages.extend(history.iter().cloned());
        let prompt = crate::generate::chat_prompt(&messages).ids(&ck.template, &ck.tok)?;
        let mut ids = vec![];
        let mut printed = 0;
        let mut out = stdout.lock();
        let mut stream_err = None;
        let generation = generate_streaming(&ck.model, &prompt, &params, &mut |id| {
            ids.push(id);
            if args.json {
                return true;
            }
            // Decode everything so far and print what is new, holding back an incomplete UTF-8
            // sequence (a byte-level token can end mid-character).
            match ck.tok.decode_skip_special(&ids) {
                Ok(text) if !text.ends_with('\u{FFFD}') => {
                    if text.len() > printed && text.is_char_boundary(printed) {
                        let _ = write!(out, "{}", &text[printed..]);
                        let _ = out.flush();
                        printed = text.len();
                    }
                    true
                }
                Ok(_) => true,
                Err(e) => {
                    stream_err = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = stream_err {
            return Err(e.into());
        }
        let reply = ck.tok.decode_skip_special(&generation.ids)?;
        if args.json {
            let line = serde_json::json!({
                "user": input,
                "assistant": reply,
                "stopped": generation.stop_id.is_some(),
            });
            writeln!(out, "{line}")?;
        } else {
            if reply.len() > printed {
                write!(out, "{}", &reply[printed.min(reply.len())..])?;
            }
            writeln!(out)?;
            if generation.stop_id.is_none() && interactive {
                eprintln!("(stopped at --max-new-tokens without an end-of-turn token)");
            }
        }
        out.flush()?;
        history.push(Message::new(Role::Assistant, reply));
    }
    Ok(())
}
