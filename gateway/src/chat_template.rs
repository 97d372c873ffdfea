//! A model's chat template (tokenizer_config.json's `chat_template`, Jinja2 as Hugging Face
//! renders it) behind one small type, as TGI's `infer/chat_template.rs` and mistral.rs do: minijinja
//! with minijinja-contrib's Python compatibility (`.strip()`, `.items()`, `.startswith()`...),
//! `trim_blocks` and `lstrip_blocks` as transformers sets them, `raise_exception(msg)` (the
//! template's refusal becomes a 400 with its message) and `strftime_now(fmt)` (Llama 3.1's date
//! line; UTC). The template sees `messages` (content flattened to a string), `add_generation_prompt`,
//! `bos_token` and `eos_token`; its text is tokenized without adding special tokens (it writes BOS
//! itself where the model wants one), as vLLM does for chat.

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::ApiError;
use crate::protocol::{ChatMessage, Content};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A message as the template sees it.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct TemplateContext<'a> {
    messages: Vec<TemplateMessage<'a>>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`; a template minijinja cannot parse is an error with its message (the
    /// server refuses to start rather than fail every chat request).
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_utc(&format, unix_now()));
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| format!("the chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt text for `messages` (checked: roles and content parts; errors name the field).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "messages must hold at least one message"));
        }
        let mut flat = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if m.role.is_empty() {
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].role"),
                    "a message's role must not be empty",
                ));
            }
            flat.push(TemplateMessage {
                role: &m.role,
                content: flatten_content(i, m.content.as_ref())?,
                name: m.name.as_deref(),
            });
        }
        let context = TemplateContext {
            messages: flat,
            add_generation_prompt,
            bos_token: self.bos_token.as_deref().unwrap_or(""),
            eos_token: self.eos_token.as_deref().unwrap_or(""),
        };
        let template = self.env.get_template(TEMPLATE_NAME).expect("added in new");
        template.render(context).map_err(|e| match e.kind() {
            // The template's own refusal (`raise_exception`): its words are the message.
            ErrorKind::InvalidOperation => ApiError::invalid_param(
                "messages",
                format!("the chat template refused these messages: {}", e.detail().unwrap_or("no reason given")),
            ),
            _ => ApiError::invalid_param("messages", format!("the chat template failed on these messages: {e:#}")),
        })
    }
}

/// A message's content as one string: text parts joined by newlines (vLLM's "string" format).
fn flatten_content(i: usize, content: Option<&Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => texts.push(t.as_str()),
                    ("text", None) => {
                        return Err(ApiError::invalid_param(
                            format!("messages[{i}].content[{j}].text"),
                            "a text part needs `text`",
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::invalid_param(
                            format!("messages[{i}].content[{j}].type"),
                            format!("content parts of type `{other}` are not supported (this model reads text only)"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Python's `strftime` for the directives chat templates use (`%d %b %Y`, `%B`, `%m`, `%H:%M:%S`,
/// `%A`, `%a`, `%j`, `%y`, `%%`), in UTC. Any other directive is an error naming it.
fn strftime_utc(format: &str, unix_seconds: i64) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = CUMULATIVE[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map_or(String::new(), String::from)),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (ChatML), as its tokenizer_config.json holds it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A Llama-3-like template: bos_token, strip(), raise_exception, strftime_now.
    const LLAMA3ISH: &str = "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system = '' %}\n{%- endif %}\n{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + strftime_now('%d %b %Y') + '\\n\\n' + system + '<|eot_id|>' }}\n{%- for message in messages %}\n    {%- if message.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user or assistant, got ' + message.role) }}{% endif %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'].strip() + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: Some(Content::Text(content.into())), name: None }
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = ChatTemplate::new(CHATML.into(), None, Some("<|im_end|>".into())).unwrap();
        let text = t.render(&[msg("user", "Hi there")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let parts = ChatMessage {
            role: "user".into(),
            content: Some(Content::Parts(vec![
                crate::protocol::ContentPart { kind: "text".into(), text: Some("a".into()) },
                crate::protocol::ContentPart { kind: "text".into(), text: Some("b".into()) },
            ])),
            name: None,
        };
        assert!(t.render(&[parts], false).unwrap().ends_with("<|im_start|>user\na\nb<|im_end|>\n"));
    }

    #[test]
    fn pycompat_bos_date_and_refusals() {
        let t = ChatTemplate::new(LLAMA3ISH.into(), Some("<|begin_of_text|>".into()), None).unwrap();
        let text = t.render(&[msg("system", " Be brief. "), msg("user", "  Hello  ")], true).unwrap();
        assert!(
            text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: "),
            "{text}"
        );
        assert!(
            text.contains("Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"),
            "{text}"
        );
        assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"), "{text}");
        let e = t.render(&[msg("tool", "x")], true).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("messages")));
        assert!(e.message.contains("roles must be user or assistant, got tool"), "{e}");
        let e = t.render(&[], true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let image = ChatMessage {
            role: "user".into(),
            content: Some(Content::Parts(vec![crate::protocol::ContentPart { kind: "image_url".into(), text: None }])),
            name: None,
        };
        assert_eq!(t.render(&[image], true).unwrap_err().param.as_deref(), Some("messages[0].content[0].type"));
        assert!(ChatTemplate::new("{% if %}".into(), None, None).is_err());
    }

    #[test]
    fn strftime_matches_python() {
        // python3 -c "import datetime; print(datetime.datetime.fromtimestamp(1709251199, datetime.UTC).strftime('%d %b %Y %B %m %y %j %A %a %H:%M:%S %%'))"
        assert_eq!(
            strftime_utc("%d %b %Y %B %m %y %j %A %a %H:%M:%S %%", 1_709_251_199).unwrap(),
            "29 Feb 2024 February 02 24 060 Thursday Thu 23:59:59 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(strftime_utc("%j", 1_735_603_200).unwrap(), "366"); // 2024-12-31
        assert!(strftime_utc("%Q", 0).is_err());
    }
}
